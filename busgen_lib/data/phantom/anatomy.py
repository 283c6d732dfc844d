"""Layered breast anatomy as seen by a linear probe: skin, fat, gland, muscle.

From the transducer down (Stavros, *Breast Ultrasound*, ch. 3): a bright skin
line; subcutaneous fat, hypoechoic lobules separated by echogenic Cooper's
ligaments; the fibroglandular layer, brighter and heterogeneous; a thin
retromammary fat layer; the pectoralis muscle, with striations. Layer depths
belong to the patient; their wavy boundaries and texture change from view to
view as the probe moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from busgen_lib.data.phantom.fields import smooth_field
from busgen_lib.data.devices import REFERENCE_SIZE

# Reflectivity (amplitude, glandular tissue ~ 1) and scatterer density per layer.
SKIN_REFLECTIVITY = 1.7
SKIN_ENTRY_ECHO = 3.0           # the bright transducer/skin interface
FAT_DENSITY = 0.45              # sparse scatterers: pre-Rayleigh texture in fat
LIGAMENT_GAIN = 3.0             # Cooper's ligaments relative to fat
LIGAMENT_WIDTH = 0.12           # level-set band of the ligament field (unit-variance units)
FAT_LOBULE_CONTRAST = 0.25
STRIATION_SHARPNESS = 4         # power of the cosine: thin bright muscle fibres
STRIATION_WAVINESS = 0.6        # fibre phase wander (cycles)
STRIATION_WAVE_LENGTH = 0.15    # fraction of width
BOUNDARY_WOBBLE = (0.02, 0.035, 0.02)   # amplitude (fraction of height): fat/gland, gland/fat, muscle
BOUNDARY_SMOOTHNESS = 0.12      # correlation length of boundaries, fraction of width
GLAND_TEXTURE_PX = 2.5          # correlation length of glandular heterogeneity at 128 px
LOBULE_SCALE = (0.05, 0.09)     # fat lobule size, fraction of width


@dataclass(frozen=True)
class Anatomy:
    """One patient's breast: layer depths (fraction of image height) and echo levels."""

    skin: float
    fat_bottom: float
    gland_bottom: float
    muscle_top: float
    fat_level: float
    gland_level: float
    gland_heterogeneity: float
    lobule_scale: float
    muscle_level: float
    striation_period: float
    striation_angle: float


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a patient's anatomy: thin or thick fat, dense or fatty gland."""
    skin = rng.uniform(0.025, 0.045)
    fat_bottom = skin + rng.uniform(0.1, 0.28)
    gland_bottom = fat_bottom + rng.uniform(0.35, 0.55)
    return Anatomy(
        skin=skin,
        fat_bottom=fat_bottom,
        gland_bottom=gland_bottom,
        muscle_top=gland_bottom + rng.uniform(0.03, 0.07),
        fat_level=rng.uniform(0.38, 0.5),
        gland_level=rng.uniform(0.9, 1.1),
        gland_heterogeneity=rng.uniform(0.25, 0.45),
        lobule_scale=rng.uniform(*LOBULE_SCALE),
        muscle_level=rng.uniform(0.55, 0.75),
        striation_period=rng.uniform(0.025, 0.045),
        striation_angle=rng.uniform(-0.15, 0.15),
    )


def _boundary(rng: np.random.Generator, depth: float, wobble: float, size: int) -> np.ndarray:
    """A layer boundary depth (px) per column: the mean depth plus a smooth wave."""
    wave = smooth_field(rng, (size,), BOUNDARY_SMOOTHNESS * size)
    return (depth + wobble * wave) * size


def _fat(anatomy: Anatomy, size: int, rng: np.random.Generator) -> np.ndarray:
    """Fat lobules bounded by thin bright ligaments (a zero level set of a smooth field)."""
    field = smooth_field(rng, (size, size), anatomy.lobule_scale * size)
    ligaments = np.exp(-(field / LIGAMENT_WIDTH) ** 2)
    lobules = 1.0 + FAT_LOBULE_CONTRAST * np.tanh(field)
    return anatomy.fat_level * lobules * (1.0 + (LIGAMENT_GAIN - 1.0) * ligaments)


def _gland(anatomy: Anatomy, size: int, rng: np.random.Generator) -> np.ndarray:
    """Fibroglandular tissue: log-normal heterogeneity around the gland level."""
    sigma = anatomy.gland_heterogeneity
    texture = smooth_field(rng, (size, size), GLAND_TEXTURE_PX * size / REFERENCE_SIZE)
    return anatomy.gland_level * np.exp(sigma * texture - 0.5 * sigma**2)


def _muscle(anatomy: Anatomy, size: int, zoom: float, rng: np.random.Generator) -> np.ndarray:
    """Pectoralis: bright oblique fibres (striations) on a mid-grey background."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = (y * np.cos(anatomy.striation_angle) + x * np.sin(anatomy.striation_angle)) / (
        anatomy.striation_period * zoom)
    phase += STRIATION_WAVINESS * smooth_field(rng, (size, size), STRIATION_WAVE_LENGTH * size)
    fibres = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** STRIATION_SHARPNESS
    return anatomy.muscle_level * (0.6 + 1.2 * fibres)


def tissue_maps(anatomy: Anatomy, size: int, zoom: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Reflectivity and scatterer-density maps (size x size) of one view's anatomy.

    `zoom` is the display depth scaling of this view (depth setting): all
    depths are multiplied by it.
    """
    rows = np.arange(size)[:, None] + 0.5
    fat_top = anatomy.skin * zoom * size
    fat_gland = _boundary(rng, anatomy.fat_bottom * zoom, BOUNDARY_WOBBLE[0] * zoom, size)[None, :]
    gland_fat = _boundary(rng, anatomy.gland_bottom * zoom, BOUNDARY_WOBBLE[1] * zoom, size)[None, :]
    muscle = _boundary(rng, anatomy.muscle_top * zoom, BOUNDARY_WOBBLE[2] * zoom, size)[None, :]
    fat = _fat(anatomy, size, rng)
    in_gland = (rows >= fat_gland) & (rows < gland_fat)
    reflectivity = np.where(in_gland, _gland(anatomy, size, rng), fat)
    reflectivity = np.where(rows >= muscle, _muscle(anatomy, size, zoom, rng), reflectivity)
    reflectivity = np.where(rows < fat_top, SKIN_REFLECTIVITY, reflectivity)
    reflectivity[0] = SKIN_ENTRY_ECHO
    in_fat = (rows >= fat_top) & ~in_gland & (rows < muscle)
    density = np.where(in_fat, FAT_DENSITY, 1.0)
    return reflectivity, density
