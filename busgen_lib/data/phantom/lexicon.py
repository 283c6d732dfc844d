"""BI-RADS ultrasound lexicon: descriptor frequencies per subtype, and rated categories.

Descriptor values follow the ACR BI-RADS Atlas, 5th ed. (2013), ultrasound
masses: shape, margin, orientation, echo pattern, posterior features,
calcifications; "halo" is Stavros' echogenic halo. Each subtype draws its
descriptors from overlapping distributions (some fibroadenomas are irregular,
some carcinomas circumscribed), so pathology is learnable but not trivial.
TNBC-like carcinomas are rounder, more often circumscribed or microlobulated,
markedly hypoechoic and enhancing (Dogan et al. 2010); node-positive cancers
are larger, more irregular, with a thicker halo.
"""

from __future__ import annotations

import numpy as np

Table = dict[str, dict[str, float]]

SUBTYPES: dict[str, dict[str, float]] = {
    "benign": {"fibroadenoma": 0.56, "cyst": 0.22, "papilloma": 0.1, "fibrocystic": 0.12},
    "malignant": {"idc": 0.48, "ilc": 0.12, "tnbc": 0.2, "dcis": 0.2},
}

# P(axillary lymph node positive) per malignant subtype; DCIS is pre-invasive.
ALN_POSITIVE_RATE: dict[str, float] = {"idc": 0.4, "ilc": 0.35, "tnbc": 0.35, "dcis": 0.05}

DESCRIPTORS: dict[str, Table] = {
    "fibroadenoma": {
        "shape": {"oval": 0.75, "round": 0.12, "irregular": 0.13},
        "margin": {"circumscribed": 0.8, "microlobulated": 0.08, "indistinct": 0.08, "angular": 0.03, "spiculated": 0.01},
        "orientation": {"parallel": 0.87, "not parallel": 0.13},
        "echo_pattern": {"hypoechoic": 0.8, "heterogeneous": 0.2},
        "posterior": {"enhancement": 0.55, "none": 0.4, "shadowing": 0.05},
        "halo": {"none": 0.88, "thin": 0.1, "thick": 0.02},
        "calcifications": {"none": 0.9, "in mass": 0.1},
    },
    "cyst": {
        "shape": {"oval": 0.6, "round": 0.35, "irregular": 0.05},
        "margin": {"circumscribed": 0.88, "indistinct": 0.08, "microlobulated": 0.04},
        "orientation": {"parallel": 0.92, "not parallel": 0.08},
        "echo_pattern": {"anechoic": 1.0},
        "posterior": {"enhancement": 0.85, "none": 0.15},
        "halo": {"none": 1.0},
        "calcifications": {"none": 1.0},
    },
    "papilloma": {
        "shape": {"oval": 0.7, "round": 0.15, "irregular": 0.15},
        "margin": {"circumscribed": 0.6, "microlobulated": 0.2, "indistinct": 0.2},
        "orientation": {"parallel": 0.8, "not parallel": 0.2},
        "echo_pattern": {"complex cystic and solid": 1.0},
        "posterior": {"enhancement": 0.5, "none": 0.45, "shadowing": 0.05},
        "halo": {"none": 0.95, "thin": 0.05},
        "calcifications": {"none": 0.9, "in mass": 0.1},
    },
    "fibrocystic": {
        "shape": {"irregular": 0.45, "oval": 0.45, "round": 0.1},
        "margin": {"indistinct": 0.4, "circumscribed": 0.4, "microlobulated": 0.15, "angular": 0.05},
        "orientation": {"parallel": 0.75, "not parallel": 0.25},
        "echo_pattern": {"heterogeneous": 0.6, "hypoechoic": 0.4},
        "posterior": {"none": 0.7, "enhancement": 0.2, "shadowing": 0.1},
        "halo": {"none": 0.85, "thin": 0.15},
        "calcifications": {"none": 0.85, "in mass": 0.15},
    },
    "idc": {
        "shape": {"irregular": 0.72, "oval": 0.15, "round": 0.13},
        "margin": {"spiculated": 0.32, "angular": 0.2, "indistinct": 0.25, "microlobulated": 0.13, "circumscribed": 0.1},
        "orientation": {"not parallel": 0.6, "parallel": 0.4},
        "echo_pattern": {"heterogeneous": 0.55, "hypoechoic": 0.45},
        "posterior": {"shadowing": 0.7, "none": 0.24, "enhancement": 0.06},
        "halo": {"none": 0.35, "thin": 0.38, "thick": 0.27},
        "calcifications": {"none": 0.7, "in mass": 0.3},
    },
    "ilc": {
        "shape": {"irregular": 0.65, "oval": 0.25, "round": 0.1},
        "margin": {"indistinct": 0.45, "spiculated": 0.25, "angular": 0.2, "circumscribed": 0.1},
        "orientation": {"parallel": 0.65, "not parallel": 0.35},
        "echo_pattern": {"heterogeneous": 0.5, "hypoechoic": 0.5},
        "posterior": {"shadowing": 0.72, "none": 0.25, "enhancement": 0.03},
        "halo": {"none": 0.5, "thin": 0.4, "thick": 0.1},
        "calcifications": {"none": 0.9, "in mass": 0.1},
    },
    "tnbc": {
        "shape": {"round": 0.45, "oval": 0.25, "irregular": 0.3},
        "margin": {"microlobulated": 0.4, "circumscribed": 0.15, "indistinct": 0.25, "angular": 0.14, "spiculated": 0.06},
        "orientation": {"not parallel": 0.6, "parallel": 0.4},
        "echo_pattern": {"hypoechoic": 0.55, "heterogeneous": 0.45},
        "posterior": {"enhancement": 0.45, "none": 0.33, "shadowing": 0.22},
        "halo": {"none": 0.55, "thin": 0.33, "thick": 0.12},
        "calcifications": {"none": 0.85, "in mass": 0.15},
    },
    "dcis": {
        "shape": {"non-mass": 1.0},
        "margin": {"indistinct": 1.0},
        "orientation": {"parallel": 1.0},
        "echo_pattern": {"hypoechoic": 0.5, "heterogeneous": 0.5},
        "posterior": {"none": 0.8, "shadowing": 0.2},
        "halo": {"none": 0.9, "thin": 0.1},
        "calcifications": {"intraductal": 0.85, "none": 0.15},
    },
}

# Node-positive cancers: halo one step thicker, margin more often spiculated/angular.
ALN_HALO_UPGRADE = {"none": "thin", "thin": "thick", "thick": "thick"}
ALN_HALO_UPGRADE_RATE = 0.6
ALN_MARGIN = {"spiculated": 0.6, "angular": 0.4}
ALN_MARGIN_RATE = 0.35

# Suspicion points per descriptor value (Stavros criteria); summed and rated with noise.
SUSPICION: dict[str, dict[str, float]] = {
    "shape": {"round": 0.4, "irregular": 1.4, "non-mass": 1.6},
    "margin": {"indistinct": 1.1, "microlobulated": 1.1, "angular": 1.4, "spiculated": 2.2},
    "orientation": {"not parallel": 1.1},
    "echo_pattern": {"anechoic": -1.5, "heterogeneous": 0.5, "complex cystic and solid": 1.2},
    "posterior": {"shadowing": 0.8, "enhancement": -0.3},
    "halo": {"thin": 0.6, "thick": 1.0},
    "calcifications": {"in mass": 1.0, "intraductal": 1.6},
}
RATER_NOISE_SD = 0.7
# Upper score bounds of BI-RADS 2, 3, 4a, 4b, 4c; above the last: 5.
BIRADS_CUTS: tuple[tuple[float, str], ...] = ((0.3, "2"), (1.2, "3"), (2.4, "4a"), (3.5, "4b"), (4.6, "4c"))


def _draw(table: dict[str, float], rng: np.random.Generator) -> str:
    values = list(table)
    probs = np.fromiter(table.values(), float)
    return values[rng.choice(len(values), p=probs / probs.sum())]


def sample_subtype(pathology: str, rng: np.random.Generator) -> str:
    """A benign or malignant subtype at the phantom's subtype mix."""
    return _draw(SUBTYPES[pathology], rng)


def sample_descriptors(subtype: str, aln_positive: bool, rng: np.random.Generator) -> dict[str, str]:
    """BI-RADS descriptors of one lesion, shifted towards aggressive ones when node-positive."""
    descriptors = {name: _draw(table, rng) for name, table in DESCRIPTORS[subtype].items()}
    if aln_positive and descriptors["shape"] != "non-mass":
        if rng.random() < ALN_HALO_UPGRADE_RATE:
            descriptors["halo"] = ALN_HALO_UPGRADE[descriptors["halo"]]
        if rng.random() < ALN_MARGIN_RATE:
            descriptors["margin"] = _draw(ALN_MARGIN, rng)
            if descriptors["shape"] != "round":
                descriptors["shape"] = "irregular"
    return descriptors


def suspicion_score(descriptors: dict[str, str]) -> float:
    """Sum of suspicion points: what a reader weighs before choosing a category."""
    return sum(SUSPICION.get(name, {}).get(value, 0.0) for name, value in descriptors.items())


def rate_birads(descriptors: dict[str, str], rng: np.random.Generator) -> str:
    """One reader's BI-RADS category: the suspicion score plus reader noise, binned.

    The noise models inter-reader disagreement (kappa ~0.3-0.5 for 4a-4c in
    practice), so the same lesion may be rated differently at another exam.
    """
    score = suspicion_score(descriptors) + rng.normal(0.0, RATER_NOISE_SD)
    for upper, category in BIRADS_CUTS:
        if score <= upper:
            return category
    return "5"
