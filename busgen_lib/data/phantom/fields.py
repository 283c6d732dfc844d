"""Smooth Gaussian random fields: the texture source for anatomy and lesions.

Filtering white noise in the Fourier domain costs two FFTs whatever the
correlation length, which keeps tissue texture cheap at any image size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _gaussian_transfer(shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Real-FFT transfer function of a Gaussian of width sigma_px, scaled to unit output variance."""
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij")
    radius2 = sum(g**2 for g in grids)
    transfer = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * radius2)
    # Unit variance: Parseval over the full (not half) spectrum of white noise.
    full = np.exp(-4.0 * (np.pi * sigma_px) ** 2 * _full_radius2(shape))
    transfer /= np.sqrt(full.mean())
    transfer.setflags(write=False)
    return transfer


def _full_radius2(shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    return sum(g**2 for g in grids)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length sigma_px."""
    noise = rng.standard_normal(shape)
    spectrum = np.fft.rfftn(noise) * _gaussian_transfer(tuple(shape), float(sigma_px))
    return np.fft.irfftn(spectrum, s=shape, axes=tuple(range(len(shape))))
