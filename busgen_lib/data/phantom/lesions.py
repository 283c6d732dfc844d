"""Lesions: 3-D geometry from BI-RADS descriptors, and how one view paints them.

A lesion is an ellipsoid (lateral a, elevational c, depth b) whose outline is
perturbed by a radial profile: low harmonics for irregular shape, high ones for
microlobulation, a triangle wave for angular margins, narrow spikes for
spiculation. A probe at azimuth t cuts the ellipsoid in an ellipse of lateral
semi-axis a*c / sqrt((c cos t)^2 + (a sin t)^2), so views of one lesion differ
in width, and the outline turns with the probe. Posterior features are
physical: the lesion's attenuation differs from tissue, and the difference
accumulates along depth in the columns below it (shadowing or enhancement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from busgen_lib.data.phantom.fields import smooth_field
from busgen_lib.data.devices import REFERENCE_SIZE

# Lateral semi-axis (fraction of image height) per subtype; node-positive x ALN_SIZE_FACTOR.
SEMI_AXIS: dict[str, tuple[float, float]] = {
    "fibroadenoma": (0.07, 0.15), "cyst": (0.05, 0.13), "papilloma": (0.05, 0.1), "fibrocystic": (0.07, 0.14),
    "idc": (0.05, 0.11), "ilc": (0.06, 0.12), "tnbc": (0.055, 0.11), "dcis": (0.08, 0.15),
}
ALN_SIZE_FACTOR = (1.15, 1.35)
# Depth / width aspect ratio by shape and orientation (BI-RADS: parallel = wider than tall).
ASPECT: dict[tuple[str, str], tuple[float, float]] = {
    ("oval", "parallel"): (0.5, 0.75), ("round", "parallel"): (0.85, 1.0),
    ("irregular", "parallel"): (0.6, 0.95), ("non-mass", "parallel"): (0.25, 0.4),
}
NOT_PARALLEL_ASPECT = (1.0, 1.4)
ELEVATION_RATIO = (0.7, 1.3)     # c / a
MIN_TOP = 0.06                   # lesion top below the skin (fraction of height)
MAX_BOTTOM = 0.8                 # lesion bottom above this depth: its posterior region stays in view

# Outline: (number of harmonics, amplitude range) for each shape / margin value.
SHAPE_HARMONICS: dict[str, tuple[tuple[int, int], tuple[float, float]]] = {
    "oval": ((2, 4), (0.0, 0.03)), "round": ((2, 4), (0.0, 0.03)),
    "irregular": ((2, 6), (0.08, 0.18)), "non-mass": ((2, 6), (0.1, 0.2)),
}
MICROLOBULE_ORDERS = (9, 15)
MICROLOBULE_AMPLITUDE = (0.04, 0.07)
ANGULAR_ORDERS = (3, 6)
ANGULAR_AMPLITUDE = (0.05, 0.1)
SPICULE_COUNT = (6, 14)
SPICULE_LENGTH = (0.2, 0.5)       # relative to the radius
SPICULE_SHARPNESS = 300           # power of cos: narrow spikes
EDGE_PX: dict[str, float] = {      # soft boundary width at 128 px
    "circumscribed": 0.6, "microlobulated": 0.8, "angular": 0.8, "spiculated": 1.0, "indistinct": 2.5,
}
VIEW_TWIST = 0.5                  # outline rotation per radian of probe azimuth

# Interior echo (reflectivity relative to glandular tissue) and texture.
ECHO_LEVEL: dict[str, tuple[float, float]] = {
    "anechoic": (0.02, 0.05), "hypoechoic": (0.15, 0.35), "heterogeneous": (0.15, 0.35),
    "complex cystic and solid": (0.03, 0.06),
}
MARKEDLY_HYPOECHOIC = (0.07, 0.16)     # TNBC-like
DCIS_ECHO_LEVEL = (0.2, 0.4)            # non-mass: subtler than a mass
HETEROGENEITY = {"heterogeneous": 0.7}
HOMOGENEOUS_TEXTURE = 0.15
TEXTURE_PX = 2.0                        # correlation length of internal texture at 128 px
SOLID_COMPONENT_ECHO = (0.45, 0.7)      # papilloma: mural solid nodule
SOLID_COMPONENT_SIZE = (0.35, 0.55)     # relative to the lesion
SCATTERER_DENSITY = {"anechoic": 0.1, "complex cystic and solid": 0.2}
SOLID_DENSITY = 0.7

# Posterior features as the extra round-trip attenuation (dB) through the lesion
# centre; negative = enhancement. Cysts (nearly no attenuation) enhance most.
POSTERIOR_DB: dict[str, tuple[float, float]] = {
    "none": (-1.0, 1.0), "enhancement": (-7.0, -3.5), "shadowing": (6.0, 12.0),
}
CYST_ENHANCEMENT_DB = (-11.0, -7.0)
HALO_PX: dict[str, float] = {"none": 0.0, "thin": 2.0, "thick": 4.0}   # at 128 px
HALO_GAIN = (1.7, 2.4)
CALCIFICATION_COUNT = {"none": (0, 0), "in mass": (2, 5), "intraductal": (4, 10)}
CALCIFICATION_AMPLITUDE = (7.0, 12.0)


@dataclass(frozen=True, eq=False)
class Lesion:
    """A physical lesion: descriptors, 3-D size and outline, echo and posterior parameters."""

    lesion_id: str
    pathology: str
    subtype: str
    descriptors: dict[str, str]
    aln_positive: bool | None
    semi_axes: tuple[float, float, float]    # lateral a, elevational c, depth b (fraction of height)
    depth: float                             # centre depth (fraction of height)
    position: tuple[float, float]            # centre in the coronal plane (fraction of height)
    harmonics: np.ndarray                    # rows (order, amplitude, phase)
    spicules: np.ndarray                     # rows (angle, length)
    angular: tuple[int, float, float]        # (order, amplitude, phase); amplitude 0 = none
    edge_px: float
    echo_level: float
    heterogeneity: float
    density: float
    posterior_db: float
    halo_px: float
    halo_gain: float
    calcifications: int
    solid_component: tuple[float, float, float]   # (echo, size, angle); size 0 = none


@dataclass(frozen=True)
class LesionView:
    """Where and how one view shows a lesion (px of the rendered image)."""

    centre: tuple[float, float]    # (row, col)
    semi_axes: tuple[float, float]  # (lateral, depth)
    tilt: float                    # in-plane rotation, radians
    twist: float                   # outline rotation from the probe azimuth, radians


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _harmonics(shape: str, margin: str, rng: np.random.Generator) -> np.ndarray:
    """Radial Fourier terms of the outline: shape gives low orders, microlobulation high ones."""
    (lo, hi), amp = SHAPE_HARMONICS[shape]
    orders = np.arange(lo, hi + 1)
    amplitudes = rng.uniform(*amp, size=len(orders)) / np.sqrt(orders - 1)
    if margin == "microlobulated":
        orders = np.append(orders, rng.integers(*MICROLOBULE_ORDERS, size=2))
        amplitudes = np.append(amplitudes, rng.uniform(*MICROLOBULE_AMPLITUDE, size=2))
    phases = rng.uniform(0, 2 * np.pi, size=len(orders))
    return np.stack([orders, amplitudes, phases], axis=1)


def _aspect(shape: str, orientation: str, rng: np.random.Generator) -> float:
    if orientation == "not parallel" and shape != "non-mass":
        return _uniform(rng, NOT_PARALLEL_ASPECT)
    return _uniform(rng, ASPECT[(shape, "parallel")])


def _echo_level(subtype: str, echo: str, rng: np.random.Generator) -> float:
    if subtype == "tnbc":
        return _uniform(rng, MARKEDLY_HYPOECHOIC)
    if subtype == "dcis":
        return _uniform(rng, DCIS_ECHO_LEVEL)
    return _uniform(rng, ECHO_LEVEL[echo])


def _posterior_db(subtype: str, posterior: str, rng: np.random.Generator) -> float:
    if subtype == "cyst" and posterior == "enhancement":
        return _uniform(rng, CYST_ENHANCEMENT_DB)
    return _uniform(rng, POSTERIOR_DB[posterior])


def sample_lesion(
    lesion_id: str,
    pathology: str,
    subtype: str,
    descriptors: dict[str, str],
    aln_positive: bool | None,
    depth_range: tuple[float, float],
    position: tuple[float, float],
    rng: np.random.Generator,
) -> Lesion:
    """Turn BI-RADS descriptors into the geometry and echo parameters of one lesion."""
    d = descriptors
    a = _uniform(rng, SEMI_AXIS[subtype]) * (_uniform(rng, ALN_SIZE_FACTOR) if aln_positive else 1.0)
    b = a * _aspect(d["shape"], d["orientation"], rng)
    c = a * _uniform(rng, ELEVATION_RATIO)
    lo, hi = depth_range
    depth = float(np.clip(rng.uniform(lo, hi), b + MIN_TOP, MAX_BOTTOM - b))
    spicules = np.empty((0, 2))
    if d["margin"] == "spiculated":
        n = int(rng.integers(*SPICULE_COUNT))
        spicules = np.stack([rng.uniform(0, 2 * np.pi, n), rng.uniform(*SPICULE_LENGTH, n)], axis=1)
    angular = (0, 0.0, 0.0)
    if d["margin"] == "angular":
        angular = (int(rng.integers(*ANGULAR_ORDERS)), _uniform(rng, ANGULAR_AMPLITUDE), _uniform(rng, (0, 2 * np.pi)))
    solid = (0.0, 0.0, 0.0)
    if d["echo_pattern"] == "complex cystic and solid":
        solid = (_uniform(rng, SOLID_COMPONENT_ECHO), _uniform(rng, SOLID_COMPONENT_SIZE), _uniform(rng, (0, 2 * np.pi)))
    return Lesion(
        lesion_id=lesion_id, pathology=pathology, subtype=subtype, descriptors=dict(d), aln_positive=aln_positive,
        semi_axes=(a, c, b), depth=depth, position=position,
        harmonics=_harmonics(d["shape"], d["margin"], rng), spicules=spicules, angular=angular,
        edge_px=EDGE_PX[d["margin"]], echo_level=_echo_level(subtype, d["echo_pattern"], rng),
        heterogeneity=HETEROGENEITY.get(d["echo_pattern"], HOMOGENEOUS_TEXTURE),
        density=SCATTERER_DENSITY.get(d["echo_pattern"], SOLID_DENSITY),
        posterior_db=_posterior_db(subtype, d["posterior"], rng),
        halo_px=HALO_PX[d["halo"]], halo_gain=_uniform(rng, HALO_GAIN),
        calcifications=int(rng.integers(CALCIFICATION_COUNT[d["calcifications"]][0],
                                        CALCIFICATION_COUNT[d["calcifications"]][1] + 1)),
        solid_component=solid,
    )


def section_width(lesion: Lesion, azimuth: float) -> float:
    """Lateral semi-axis of the ellipsoid's cross-section in a plane at `azimuth` (radians)."""
    a, c, _ = lesion.semi_axes
    return a * c / np.hypot(c * np.cos(azimuth), a * np.sin(azimuth))


def radial_profile(lesion: Lesion, phi: np.ndarray) -> np.ndarray:
    """Outline radius (in units of the ellipse) at polar angle phi."""
    k, amp, phase = lesion.harmonics.T
    r = 1.0 + np.cos(phi[..., None] * k + phase) @ amp
    order, amp_angular, phase_angular = lesion.angular
    if amp_angular:
        # A triangle wave in angle: straight edges meeting at sharp corners.
        r += amp_angular * (2 / np.pi) * np.arcsin(np.cos(order * phi + phase_angular))
    for angle, length in lesion.spicules:
        r += length * np.maximum(np.cos(phi - angle), 0.0) ** SPICULE_SHARPNESS
    return r


def _polar(view: LesionView, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius and polar angle of every pixel in the lesion's ellipse frame."""
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = rows - view.centre[0], cols - view.centre[1]
    cos_t, sin_t = np.cos(view.tilt), np.sin(view.tilt)
    u = (dx * cos_t + dy * sin_t) / view.semi_axes[0]
    v = (-dx * sin_t + dy * cos_t) / view.semi_axes[1]
    return np.hypot(u, v), np.arctan2(v, u)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return ndimage.binary_fill_holes(mask)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


@dataclass(frozen=True, eq=False)
class Footprint:
    """A lesion in one view: its exact mask, soft membership and distance outside (px)."""

    mask: np.ndarray
    soft: np.ndarray
    outside_px: np.ndarray


def footprint(lesion: Lesion, view: LesionView, size: int) -> Footprint:
    """The lesion's pixels in a view: one connected, hole-free mask plus a soft edge."""
    rho, phi = _polar(view, size)
    r = radial_profile(lesion, phi - view.twist)
    radius_px = np.sqrt(view.semi_axes[0] * view.semi_axes[1])
    outside_px = (rho - r) * radius_px
    edge = lesion.edge_px * size / REFERENCE_SIZE
    soft = np.clip(0.5 - outside_px / edge, 0.0, 1.0)
    mask = _largest_component(rho < r)
    if not mask.any():
        # A lesion smaller than a pixel still occupies the pixel at its centre.
        row, col = (int(np.clip(c, 0, size - 1)) for c in view.centre)
        mask[row, col] = True
    return Footprint(mask=mask, soft=soft, outside_px=outside_px)


def paint_lesion(
    reflectivity: np.ndarray,
    density: np.ndarray,
    attenuation_db: np.ndarray,
    points: list[tuple[float, float, float]],
    lesion: Lesion,
    view: LesionView,
    fp: Footprint,
    rng: np.random.Generator,
) -> None:
    """Paint a lesion into a view's maps in place: echo, halo, attenuation, calcifications."""
    size = reflectivity.shape[0]
    scale = size / REFERENCE_SIZE
    sigma = lesion.heterogeneity
    texture = np.exp(sigma * smooth_field(rng, reflectivity.shape, TEXTURE_PX * scale) - 0.5 * sigma**2)
    interior = lesion.echo_level * texture
    echo, rel_size, angle = lesion.solid_component
    if rel_size:
        interior = np.where(_solid_component(view, rel_size, angle, size), echo * texture, interior)
    if lesion.halo_px:
        halo = np.exp(-((fp.outside_px / (lesion.halo_px * scale)) ** 2)) * (fp.outside_px > 0)
        reflectivity *= 1.0 + (lesion.halo_gain - 1.0) * halo
    reflectivity[:] = reflectivity * (1.0 - fp.soft) + interior * fp.soft
    density[:] = density * (1.0 - fp.soft) + lesion.density * fp.soft
    # Spread the posterior dB over the lesion's depth extent through its centre.
    attenuation_db += lesion.posterior_db / (2.0 * view.semi_axes[1]) * fp.soft
    points.extend(_calcifications(lesion, fp.mask, rng))


def _solid_component(view: LesionView, rel_size: float, angle: float, size: int) -> np.ndarray:
    """A mural nodule: a small disc touching the lesion wall at `angle`."""
    offset = 1.0 - rel_size
    a, b = view.semi_axes
    centre = (view.centre[0] + offset * b * np.sin(angle), view.centre[1] + offset * a * np.cos(angle))
    nodule = LesionView(centre=centre, semi_axes=(a * rel_size, b * rel_size), tilt=view.tilt, twist=0.0)
    rho, _ = _polar(nodule, size)
    return rho < 1.0


def _calcifications(lesion: Lesion, mask: np.ndarray, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Microcalcifications: strong point reflectors at random pixels of the lesion."""
    rows, cols = np.nonzero(mask)
    if not lesion.calcifications or not len(rows):
        return []
    picks = rng.choice(len(rows), size=min(lesion.calcifications, len(rows)), replace=False)
    amps = rng.uniform(*CALCIFICATION_AMPLITUDE, size=len(picks))
    return [(float(rows[i]), float(cols[i]), float(amp)) for i, amp in zip(picks, amps)]
