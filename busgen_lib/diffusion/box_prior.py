"""Per-pathology kernel-density priors over lesion boxes, for sampling (§4.3.2).

At generation time BUSGen needs plausible lesion boxes to condition on. As in the
reference code, they come from a kernel density estimate per pathology over the
box centre, aspect ratio and area of the training boxes, plus the empirical
number of boxes per image. Features are (cx, cy, log(w/h), log(w*h)): logs make
aspect and area additive and keep sampled widths/heights positive.

Bandwidth: Scott's rule on standardised features. sklearn's `KernelDensity` has
one isotropic bandwidth, so each feature is first scaled to unit variance (as
scipy's `gaussian_kde` does with the data covariance); Scott's rule is then
closed-form and deterministic, where `GridSearchCV` over log-likelihood is noisy
and slow on the few dozen boxes a small pathology class may have.

The prior saves as readable JSON (the fitted features, scaling and bandwidth) beside
the model: no pickle, so a prior can be inspected, diffed and loaded safely.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.neighbors import KernelDensity

from busgen_lib.data.manifest import is_flagged
from busgen_lib.data.schema import BOXES_MISSING, PATHOLOGIES, Box, box_problem, parse_boxes

FEATURES: tuple[str, ...] = ("cx", "cy", "log_aspect", "log_area")
LESION_PATHOLOGIES: tuple[str, ...] = tuple(p for p in PATHOLOGIES if p != "normal")
FORMAT = "busgen-box-prior/1"
MAX_ROUNDS = 100  # rejection rounds before giving up: a sane prior places most draws inside


# --------------------------------------------------------------------------- features

def boxes_to_features(boxes: Sequence[Box]) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) → rows of FEATURES."""
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.column_stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, np.log(w / h), np.log(w * h)])


def features_to_boxes(features: np.ndarray) -> np.ndarray:
    """Rows of FEATURES → boxes (x0, y0, x1, y1); the inverse of `boxes_to_features`."""
    cx, cy, log_aspect, log_area = features.T
    w = np.exp((log_area + log_aspect) / 2)
    h = np.exp((log_area - log_aspect) / 2)
    return np.column_stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _lesion_boxes(df: pd.DataFrame, pathology: str) -> list[list[Box]]:
    """Each boxed image's boxes for one pathology; images flagged or left without boxes carry no box shape."""
    rows = df[df["pathology"] == pathology]
    if BOXES_MISSING in rows:
        rows = rows[~is_flagged(rows[BOXES_MISSING])]
    per_image = [parse_boxes(text) for text in rows["boxes"]]
    return [boxes for boxes in per_image if boxes]


# --------------------------------------------------------------------------- one pathology

@dataclass
class _PathologyPrior:
    """The KDE of one pathology in standardised feature space, and its box-count distribution."""

    features: np.ndarray     # (n, 4) training features, raw units
    mean: np.ndarray         # (4,)
    scale: np.ndarray        # (4,)
    bandwidth: float         # in standardised units
    counts: np.ndarray       # distinct boxes-per-image values
    count_probs: np.ndarray  # their empirical frequencies

    @classmethod
    def fit(cls, per_image: list[list[Box]]) -> _PathologyPrior:
        features = boxes_to_features([box for boxes in per_image for box in boxes])
        mean, std = features.mean(axis=0), features.std(axis=0)
        scale = np.where(std > 0, std, 1.0)  # a constant feature (e.g. one box) keeps unit scale
        bandwidth = float(KernelDensity(bandwidth="scott").fit((features - mean) / scale).bandwidth_)
        counts, frequency = np.unique([len(boxes) for boxes in per_image], return_counts=True)
        return cls(features, mean, scale, bandwidth, counts, frequency / frequency.sum())

    def kde(self) -> KernelDensity:
        return KernelDensity(bandwidth=self.bandwidth).fit((self.features - self.mean) / self.scale)

    def to_json(self) -> dict:
        return {
            "bandwidth": self.bandwidth,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "boxes_per_image": {int(c): float(p) for c, p in zip(self.counts, self.count_probs)},
            "features": self.features.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict) -> _PathologyPrior:
        counts = data["boxes_per_image"]
        return cls(
            features=np.asarray(data["features"], dtype=float).reshape(-1, len(FEATURES)),
            mean=np.asarray(data["mean"], dtype=float),
            scale=np.asarray(data["scale"], dtype=float),
            bandwidth=float(data["bandwidth"]),
            counts=np.asarray([int(c) for c in counts], dtype=int),
            count_probs=np.asarray(list(counts.values()), dtype=float),
        )


# --------------------------------------------------------------------------- the prior

class BoxPrior:
    """Samples lesion boxes per pathology from KDEs fitted on a manifest's boxes."""

    def __init__(self, priors: dict[str, _PathologyPrior]):
        self._priors = priors
        self._kdes = {p: prior.kde() for p, prior in priors.items()}

    @property
    def pathologies(self) -> tuple[str, ...]:
        """Lesion pathologies this prior can place boxes for."""
        return tuple(self._priors)

    @classmethod
    def fit(cls, df: pd.DataFrame) -> BoxPrior:
        """Fit one prior per lesion pathology that has boxed images in `df` (a manifest)."""
        per_pathology = {p: _lesion_boxes(df, p) for p in LESION_PATHOLOGIES}
        priors = {p: _PathologyPrior.fit(boxes) for p, boxes in per_pathology.items() if boxes}
        if not priors:
            raise ValueError("the manifest has no lesion boxes to fit a box prior on "
                             f"(no benign or malignant rows with a non-empty 'boxes' field among {len(df)} rows)")
        return cls(priors)

    def sample(self, pathology: str, n: int, rng: np.random.Generator) -> list[list[Box]]:
        """Boxes for `n` images of `pathology`, all inside the image; normal images get none."""
        if pathology not in PATHOLOGIES:
            raise ValueError(f"unknown pathology {pathology!r}; choose one of {', '.join(PATHOLOGIES)}")
        if pathology == "normal":
            return [[] for _ in range(n)]
        if pathology not in self._priors:
            raise ValueError(f"the box prior has no {pathology} boxes (it was fitted on a manifest without boxed "
                             f"{pathology} images); fit it on data that has them, or give explicit boxes")
        prior = self._priors[pathology]
        counts = rng.choice(prior.counts, size=n, p=prior.count_probs)
        boxes = self._inside_boxes(pathology, int(counts.sum()), rng)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return [boxes[a:b] for a, b in zip(starts[:-1], starts[1:])]

    def _inside_boxes(self, pathology: str, n: int, rng: np.random.Generator) -> list[Box]:
        """`n` KDE draws, redrawing those that leave the image (rejection keeps the in-image shape of the KDE)."""
        prior, kde = self._priors[pathology], self._kdes[pathology]
        accepted: list[Box] = []
        for _ in range(MAX_ROUNDS):
            if len(accepted) == n:
                return accepted
            # KernelDensity.sample takes a RandomState, not a Generator: wrap rng's bit generator (shared
            # state, so draws advance rng; seeding a fresh RandomState per call would cost ~0.1 ms).
            z = kde.sample(n - len(accepted), random_state=np.random.RandomState(rng.bit_generator))
            drawn = features_to_boxes(z * prior.scale + prior.mean)
            accepted += [box for box in map(tuple, drawn.tolist()) if box_problem(box) is None]
        if len(accepted) == n:
            return accepted
        raise RuntimeError(f"could place only {len(accepted)} of {n} {pathology} boxes inside the image after "
                           f"{MAX_ROUNDS} rounds of redrawing; the prior puts almost no mass inside 0..1 — "
                           "check that the manifest's boxes are relative (0..1) coordinates")

    # ----------------------------------------------------------------------- persistence

    def to_json(self) -> dict:
        """A JSON-able dict: fitted features, scaling and bandwidth per pathology."""
        return {"format": FORMAT, "features": list(FEATURES),
                "pathologies": {p: prior.to_json() for p, prior in self._priors.items()}}

    @classmethod
    def from_json(cls, data: dict) -> BoxPrior:
        """Rebuild from `to_json` output; the same rng then gives the same samples."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a box prior in format {FORMAT!r} (found format {data.get('format')!r})")
        return cls({p: _PathologyPrior.from_json(d) for p, d in data["pathologies"].items()})

    def save(self, path: str | Path) -> Path:
        """Write the prior as JSON (readable, no pickle), e.g. beside the model checkpoint."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BoxPrior:
        """Read a prior written by `save`."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
