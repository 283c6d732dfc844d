"""Screen furniture burnt into exported B-mode frames: depth ticks, text, focus marker.

Real exports carry the scanner's UI; its layout is a manufacturer's signature
that a classifier (or a generative model) can pick up, so the phantom draws it
too. Text content changes per image (dates, settings), only its place and
style are fixed per manufacturer.
"""

from __future__ import annotations

import numpy as np

from busgen_lib.data.devices import REFERENCE_SIZE, DeviceSpec

GLYPH_SHAPE = (5, 3)         # rows x cols of one character cell at 128 px
GLYPH_PITCH = (7, 4)         # line and character pitch at 128 px
GLYPHS_PER_LINE = (4, 9)
GLYPH_FILL = 0.55            # fraction of lit cells in a random glyph
MARGIN_PX = 2
FOCUS_MARKER_PX = 3          # half-height of the focus triangle at 128 px


def _scale(size: int) -> int:
    return max(1, round(size / REFERENCE_SIZE))


def _draw_ticks(image: np.ndarray, device: DeviceSpec) -> None:
    style, size = device.overlay, image.shape[0]
    s = _scale(size)
    length = max(2 * s, round(style.tick_length * size))
    cols = slice(0, length) if style.tick_side == "left" else slice(size - length, size)
    for depth in np.arange(style.tick_spacing, 1.0, style.tick_spacing):
        row = int(round(depth * size))
        image[row:row + s, cols] = style.brightness


def _draw_focus(image: np.ndarray, device: DeviceSpec) -> None:
    """A small triangle beside the ticks at the transmit focus depth."""
    style, size = device.overlay, image.shape[0]
    s = _scale(size)
    half = FOCUS_MARKER_PX * s
    centre = int(round(device.focus_depth * size))
    offset = max(2 * s, round(style.tick_length * size)) + s
    dy, dx = np.mgrid[-half:half + 1, 0:half + 1]
    triangle = np.abs(dy) <= half - dx
    rows = centre + dy
    cols = offset + dx if style.tick_side == "left" else size - 1 - offset - dx
    keep = triangle & (rows >= 0) & (rows < size)
    image[rows[keep], cols[keep]] = style.brightness


def _draw_text(image: np.ndarray, device: DeviceSpec, rng: np.random.Generator) -> None:
    """Lines of random glyphs in the manufacturer's corner."""
    style, size = device.overlay, image.shape[0]
    s = _scale(size)
    gh, line_pitch = GLYPH_SHAPE[0] * s, GLYPH_PITCH[0] * s
    top = style.text_corner[0] == "t"
    left = style.text_corner[1] == "l"
    for line in range(style.text_lines):
        n_glyphs = int(rng.integers(*GLYPHS_PER_LINE))
        cells = np.zeros((GLYPH_SHAPE[0], n_glyphs, GLYPH_PITCH[1]), bool)
        cells[:, :, :GLYPH_SHAPE[1]] = rng.random((GLYPH_SHAPE[0], n_glyphs, GLYPH_SHAPE[1])) < GLYPH_FILL
        strip = np.kron(cells.reshape(GLYPH_SHAPE[0], -1), np.ones((s, s), bool))
        row0 = MARGIN_PX * s + line * line_pitch if top else size - MARGIN_PX * s - (line + 1) * line_pitch
        width = min(strip.shape[1], size - 2 * MARGIN_PX * s)
        col0 = MARGIN_PX * s if left else size - MARGIN_PX * s - width
        if row0 < 0 or row0 + gh > size:
            break
        region = image[row0:row0 + gh, col0:col0 + width]
        region[strip[:, :width]] = style.brightness


def draw_overlay(image: np.ndarray, device: DeviceSpec, rng: np.random.Generator) -> None:
    """Draw the device's overlay into an 8-bit image in place."""
    _draw_ticks(image, device)
    if device.overlay.focus_marker:
        _draw_focus(image, device)
    _draw_text(image, device, rng)
