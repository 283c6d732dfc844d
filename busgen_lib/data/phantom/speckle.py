"""Speckle formation: scatterers convolved with a device PSF, then envelope detection.

The received (baseband, IQ) signal is the tissue's complex scatterer field
convolved with the point-spread function. Each resolution cell sums many
scatterers with random phases, so in homogeneous tissue the IQ signal is a
circular complex Gaussian and its envelope |IQ| is Rayleigh distributed with
SNR = mean/std = sqrt(pi / (4 - pi)) ~ 1.91 (fully developed speckle; Burckhardt
1978). Sparse scatterers (low density) give pre-Rayleigh statistics; spatial
compounding averages frames steered at different angles, whose speckle is
partly decorrelated, and so raises the SNR.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import fft

from busgen_lib.data.devices import REFERENCE_SIZE, DeviceSpec

PSF_SUPPORT_SIGMAS = 3.5   # kernel half-width in PSF sigmas
FWHM_PER_SIGMA = 2.3548    # Gaussian full width at half maximum / sigma


def psf_sigmas(device: DeviceSpec, size: int) -> tuple[float, float]:
    """(axial, lateral) PSF sigma in px for an image of `size` px."""
    scale = size / REFERENCE_SIZE
    return device.psf_axial_px * scale, device.psf_lateral_px * scale


def psf_half_width(device: DeviceSpec, size: int) -> int:
    """Kernel half-width in px: the zero-padding a linear convolution needs."""
    return int(np.ceil(PSF_SUPPORT_SIGMAS * max(psf_sigmas(device, size))))


def psf_kernel(device: DeviceSpec, size: int, steer_deg: float = 0.0) -> np.ndarray:
    """Complex baseband PSF of one (possibly steered) frame, normalised to unit energy.

    A Gaussian pulse envelope (axial sigma from pulse length / frequency, lateral
    from lambda * F#), rotated by the steering angle; after IQ demodulation along
    depth a steered beam keeps a phase ramp k * (x sin t + y (cos t - 1)), which
    is what decorrelates speckle between compounded frames.
    """
    sigma_ax, sigma_lat = psf_sigmas(device, size)
    half = psf_half_width(device, size)
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    theta = np.deg2rad(steer_deg)
    axial = y * np.cos(theta) + x * np.sin(theta)
    lateral = -y * np.sin(theta) + x * np.cos(theta)
    envelope = np.exp(-0.5 * ((axial / sigma_ax) ** 2 + (lateral / sigma_lat) ** 2))
    # Depth-wavenumber of the RF carrier: `pulse_cycles` periods span one FWHM.
    wavenumber = 2.0 * np.pi * device.pulse_cycles / (FWHM_PER_SIGMA * sigma_ax)
    phase = wavenumber * (x * np.sin(theta) + y * (np.cos(theta) - 1.0))
    kernel = envelope * np.exp(1j * phase)
    return kernel / np.sqrt(np.sum(np.abs(kernel) ** 2))


def steering_angles(device: DeviceSpec) -> np.ndarray:
    """Steering angles (degrees) of the frames a device compounds."""
    if device.compound_angles <= 1:
        return np.zeros(1)
    return np.linspace(-device.steer_deg, device.steer_deg, device.compound_angles)


@lru_cache(maxsize=128)
def _transfer_functions(device: DeviceSpec, size: int, shape: tuple[int, int]) -> np.ndarray:
    """FFTs of the device's frame PSFs on a `shape` grid, kernel centred at the origin."""
    angles = steering_angles(device)
    out = np.empty((len(angles), *shape), complex)
    for k, angle in enumerate(angles):
        kernel = psf_kernel(device, size, angle)
        half = kernel.shape[0] // 2
        grid = np.zeros(shape, complex)
        grid[:kernel.shape[0], :kernel.shape[1]] = kernel
        out[k] = fft.fft2(np.roll(grid, (-half, -half), axis=(0, 1)))
    out.setflags(write=False)
    return out


def scatterer_field(reflectivity: np.ndarray, density: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Complex scatterers: random amplitude and phase, sparse where density < 1.

    Amplitudes are scaled by 1/sqrt(density) so that the mean backscattered
    power follows `reflectivity`**2 whatever the density: density shapes the
    speckle statistics, reflectivity the echogenicity.
    """
    field = (rng.standard_normal(reflectivity.shape) + 1j * rng.standard_normal(reflectivity.shape)) / np.sqrt(2.0)
    if density is not None:
        present = rng.random(reflectivity.shape) < density
        field *= present / np.sqrt(np.maximum(density, 1e-6))
    return field * reflectivity


def simulate_iq(
    reflectivity: np.ndarray,
    device: DeviceSpec,
    rng: np.random.Generator,
    density: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> np.ndarray:
    """IQ frames (frames, H, W) of a reflectivity map imaged by `device`.

    `points` are strong point reflectors (row, col, amplitude), e.g. calcifications.
    The map is edge-padded by the PSF half-width so that the linear convolution
    (one FFT per frame) has no wrap-around inside the image.
    """
    size = reflectivity.shape[0]
    pad = psf_half_width(device, size)
    padded_refl = np.pad(reflectivity, pad, mode="edge")
    padded_density = None if density is None else np.pad(density, pad, mode="edge")
    field = scatterer_field(padded_refl, padded_density, rng)
    if points is not None and len(points):
        rows = points[:, 0].astype(int) + pad
        cols = points[:, 1].astype(int) + pad
        phases = np.exp(2j * np.pi * rng.random(len(points)))
        np.add.at(field, (rows, cols), points[:, 2] * phases)
    shape = (fft.next_fast_len(field.shape[0]), fft.next_fast_len(field.shape[1]))
    spectrum = fft.fft2(field, s=shape)
    frames = fft.ifft2(spectrum[None] * _transfer_functions(device, size, shape), axes=(-2, -1))
    h, w = reflectivity.shape
    return frames[:, pad:pad + h, pad:pad + w]


def detect_envelope(
    iq: np.ndarray,
    path_gain: np.ndarray | float = 1.0,
    noise_amplitude: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Envelope |IQ| after attenuation (`path_gain`) and additive electronic noise, compounded.

    Noise enters the receiver after the tissue has attenuated the echo and
    before time-gain compensation, so TGC amplifies it at depth.
    """
    signal = iq * path_gain
    if noise_amplitude > 0.0:
        noise = rng.standard_normal(iq.shape) + 1j * rng.standard_normal(iq.shape)
        signal = signal + noise * (noise_amplitude / np.sqrt(2.0))
    return np.abs(signal).mean(axis=0)


def homogeneous_envelope(device: DeviceSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Envelope (before log compression) of uniform, fully developed speckle.

    No attenuation and no electronic noise: the pure detection stage, whose
    statistics should be Rayleigh for a device without spatial compounding.
    """
    reflectivity = np.ones((size, size))
    return detect_envelope(simulate_iq(reflectivity, device, rng))


def speckle_snr(envelope: np.ndarray) -> float:
    """Speckle signal-to-noise ratio mean/std (1.91 for a Rayleigh envelope)."""
    return float(envelope.mean() / envelope.std())
