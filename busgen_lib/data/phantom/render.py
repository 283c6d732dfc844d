"""The B-mode acquisition and display chain of one device, from a scene to 8 bits.

IQ from scatterers * PSF (speckle.py), then, as on a scanner: frequency-
dependent attenuation accumulated along depth (with the scene's lesion
attenuation, hence posterior shadowing/enhancement), electronic noise, envelope
detection and compounding, time-gain compensation (which undoes only part of
the attenuation, in the device's own curve), a focal gain bump, log compression
over the device's dynamic range, post-processing smoothing, grey map and the
screen overlay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from busgen_lib.data.phantom.overlay import draw_overlay
from busgen_lib.data.phantom.speckle import detect_envelope, simulate_iq
from busgen_lib.data.devices import REFERENCE_SIZE, TGC_DEPTHS, DeviceSpec

# Round-trip soft-tissue attenuation over the full image depth, per MHz
# (0.5 dB/cm/MHz x 2 ways x ~2.5 cm field of view).
ATTENUATION_DB_PER_MHZ = 2.5
TOP_DB = 30.0             # envelope level (dB re glandular tissue) shown as white
FOCAL_GAIN_DB = 2.0       # brightness bump at the transmit focus
FOCAL_WIDTH = 0.15        # fraction of height
ENVELOPE_FLOOR = 1e-6


@dataclass
class Scene:
    """What the probe sees in one view, independent of the device.

    reflectivity/density: tissue maps; attenuation_db: extra round-trip
    attenuation per px of depth (lesions); points: strong reflectors (row, col,
    amplitude); labels: 0 = background, k = k-th visible lesion; zoom: depth
    scaling of this view (larger = fewer cm per px).
    """

    reflectivity: np.ndarray
    density: np.ndarray
    attenuation_db: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    zoom: float = 1.0


def attenuation_per_px(device: DeviceSpec, size: int, zoom: float) -> float:
    """Background round-trip attenuation (dB per px of depth) at the device's frequency."""
    return ATTENUATION_DB_PER_MHZ * device.center_mhz / (size * zoom)


def path_gain(scene: Scene, device: DeviceSpec) -> np.ndarray:
    """Amplitude factor from the attenuation accumulated above each pixel."""
    size = scene.reflectivity.shape[0]
    per_px = attenuation_per_px(device, size, scene.zoom) + scene.attenuation_db
    return 10.0 ** (-np.cumsum(per_px, axis=0) / 20.0)


def tgc_db(device: DeviceSpec, size: int, zoom: float = 1.0) -> np.ndarray:
    """Receive gain per row: partial attenuation compensation + the device curve + focus bump."""
    rows = np.arange(1, size + 1)
    depth = rows / size
    compensation = device.tgc_compensation * attenuation_per_px(device, size, zoom) * rows
    curve = np.interp(depth, TGC_DEPTHS, device.tgc_db)
    focus = FOCAL_GAIN_DB * np.exp(-(((depth - device.focus_depth) / FOCAL_WIDTH) ** 2))
    return compensation + curve + focus + device.gain_db


def log_compress(envelope_db: np.ndarray, device: DeviceSpec) -> np.ndarray:
    """Map [TOP_DB - dynamic range, TOP_DB] to [0, 1] and apply the grey map."""
    low = TOP_DB - device.dynamic_range_db
    return np.clip((envelope_db - low) / device.dynamic_range_db, 0.0, 1.0) ** device.gray_gamma


def render_image(scene: Scene, device: DeviceSpec, rng: np.random.Generator) -> np.ndarray:
    """Image a scene with a device: an 8-bit B-mode frame (H x W, uint8)."""
    size = scene.reflectivity.shape[0]
    iq = simulate_iq(scene.reflectivity, device, rng, density=scene.density, points=scene.points)
    noise = 10.0 ** (device.noise_db / 20.0)
    envelope = detect_envelope(iq, path_gain(scene, device), noise, rng)
    level_db = 20.0 * np.log10(np.maximum(envelope, ENVELOPE_FLOOR)) + tgc_db(device, size, scene.zoom)[:, None]
    if device.despeckle_px:
        level_db = ndimage.gaussian_filter(level_db, device.despeckle_px * size / REFERENCE_SIZE)
    image = np.round(255.0 * log_compress(level_db, device)).astype(np.uint8)
    draw_overlay(image, device, rng)
    return image
