"""Compose one view's scene: the patient's anatomy plus every lesion the probe plane cuts.

The view is aimed at its target lesion. Another lesion of the patient appears
when the image plane (through the target, at the probe azimuth) passes within
its elevational extent, at the lateral position its coronal offset projects
to, and smaller the further from its centre the plane cuts it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from busgen_lib.data.phantom.anatomy import tissue_maps
from busgen_lib.data.phantom.cohort import Patient, View
from busgen_lib.data.phantom.lesions import (
    VIEW_TWIST, Footprint, Lesion, LesionView, footprint, paint_lesion, section_width,
)
from busgen_lib.data.phantom.render import Scene

VISIBLE_SECTION = 0.8        # a plane cutting within 80 % of the elevational semi-axis shows the lesion
MIN_LESION_PX = 6            # smaller cuts are not annotated (nor painted)
SEPARATION_PX = 2            # lesions must not touch: one mask component per lesion


def _target_view(lesion: Lesion, view: View, size: int) -> LesionView:
    azimuth = np.deg2rad(view.azimuth_deg)
    scale = view.zoom * size
    return LesionView(
        centre=(lesion.depth * scale, (0.5 + view.offset) * size),
        semi_axes=(section_width(lesion, azimuth) * scale, lesion.semi_axes[2] * scale),
        tilt=np.deg2rad(view.tilt_deg),
        twist=azimuth * VIEW_TWIST,
    )


def _neighbour_view(other: Lesion, target: Lesion, target_view: LesionView, view: View, size: int) -> LesionView | None:
    """Where `other` appears in a view aimed at `target`, or None when the plane misses it."""
    azimuth = np.deg2rad(view.azimuth_deg)
    dx = other.position[0] - target.position[0]
    dz = other.position[1] - target.position[1]
    distance = abs(-dx * np.sin(azimuth) + dz * np.cos(azimuth))
    across = section_width(other, azimuth + np.pi / 2)
    if distance >= VISIBLE_SECTION * across:
        return None
    shrink = np.sqrt(1.0 - (distance / across) ** 2)
    scale = view.zoom * size
    lateral = (dx * np.cos(azimuth) + dz * np.sin(azimuth)) * scale
    return LesionView(
        centre=(other.depth * scale, target_view.centre[1] + lateral),
        semi_axes=(section_width(other, azimuth) * scale * shrink, other.semi_axes[2] * scale * shrink),
        tilt=np.deg2rad(view.tilt_deg),
        twist=azimuth * VIEW_TWIST,
    )


def _lesion_views(patient: Patient, view: View, size: int) -> list[tuple[Lesion, LesionView]]:
    """The target first, then any neighbour the plane cuts."""
    if view.target is None:
        return []
    target = patient.lesions[view.target]
    target_view = _target_view(target, view, size)
    shown = [(target, target_view)]
    for k, other in enumerate(patient.lesions):
        if k != view.target:
            other_view = _neighbour_view(other, target, target_view, view, size)
            if other_view is not None:
                shown.append((other, other_view))
    return shown


def _fits(fp: Footprint, labels: np.ndarray) -> bool:
    """A neighbour is shown when large enough to annotate and clear of the lesions already painted."""
    if fp.mask.sum() < MIN_LESION_PX:
        return False
    grown = ndimage.binary_dilation(fp.mask, iterations=SEPARATION_PX)
    return not (grown & (labels > 0)).any()


def build_scene(patient: Patient, view: View, size: int, rng: np.random.Generator) -> tuple[Scene, list[Lesion]]:
    """The scene of one view and the lesions visible in it (label k -> lesions[k - 1])."""
    reflectivity, density = tissue_maps(patient.anatomy, size, view.zoom, rng)
    attenuation = np.zeros_like(reflectivity)
    labels = np.zeros(reflectivity.shape, np.uint8)
    points: list[tuple[float, float, float]] = []
    visible: list[Lesion] = []
    for lesion, lesion_view in _lesion_views(patient, view, size):
        fp = footprint(lesion, lesion_view, size)
        if visible and not _fits(fp, labels):
            continue
        paint_lesion(reflectivity, density, attenuation, points, lesion, lesion_view, fp, rng)
        visible.append(lesion)
        labels[fp.mask] = len(visible)
    scene = Scene(reflectivity, density, attenuation, np.asarray(points, float).reshape(-1, 3), labels, view.zoom)
    return scene, visible
