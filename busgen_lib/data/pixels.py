"""One rule for turning any stored pixel type into a grayscale intensity in [0, 1].

Used by manifest validation (so a file that cannot be read is named before any
work starts) and by image loading (so what was validated is what is trained on).

The rule, by Pillow mode:

* 8-bit grey, bilevel, palette, RGB(A), grey+alpha: ITU-R 601-2 luma through
  `convert("L")` (palettes are looked up, alpha is dropped), divided by 255;
* 16-bit grey ("I;16*"), and 32-bit integer ("I", how some Pillow versions open
  16-bit PNGs): divided by 65535, so the full 16-bit range maps to [0, 1];
  integer values outside 0..65535 are refused;
* 32-bit float ("F"): taken as the intensity itself, which must lie in 0..1.
  Floats in any other range are refused rather than guessed at: 0..255,
  0..65535 and a −1..1 convention cannot be told apart from the values alone.

Everything else (CMYK, YCbCr, LAB, HSV, ...) is refused by validation (manifest.IMAGE_MODES).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from busgen_lib.errors import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535.0


def pixel_range_problem(im: Image.Image) -> str | None:
    """Why a decoded image has no 0..1 intensity under the rule above, or None when it has one."""
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float32)
        if not np.isfinite(values).all():
            return "float pixels include NaN or infinity; fix or re-export the image"
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            return (f"float pixels span {low:g}..{high:g}, but float images are read as intensities in 0..1; "
                    "rescale them to 0..1, or save the image as 8- or 16-bit integers")
    elif im.mode == "I":
        values = np.asarray(im)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > SIXTEEN_BIT_MAX:
            return (f"32-bit integer pixels span {low}..{high}, outside the 16-bit range 0..65535 they are read "
                    "in; save the image as 8- or 16-bit")
    return None


def unit_grayscale(im: Image.Image, name: str = "image") -> np.ndarray:
    """(H, W) float32 intensities in [0, 1] of a Pillow image, or DataError naming `name` and why."""
    if (why := pixel_range_problem(im)) is not None:
        raise DataError(f"{name}: {why}")
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32).copy()
    if im.mode in SIXTEEN_BIT_MODES:
        return np.asarray(im, dtype=np.float32) / SIXTEEN_BIT_MAX
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
