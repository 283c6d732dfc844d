"""The 18 scanner device types of the phantom: 9 manufacturers x 2 linear probes.

A device is a *physical* domain shift, not a watermark: it sets the point-spread
function (speckle grain, from centre frequency and aperture), the frequency-
dependent attenuation that the time-gain compensation (TGC) curve only partly
undoes, the dynamic range of log compression, electronic noise, spatial
compounding and post-processing, and the manufacturer's screen overlay (shared
by both probes of a manufacturer, so overlay alone cannot tell the 18 apart).
Names are fictional.
"""

from __future__ import annotations

from dataclasses import dataclass

# PSF width per unit of (pulse cycles / MHz) and (f-number / MHz), in px of a 128 px
# image. Exaggerated relative to a 4 cm field of view so that the speckle grain
# is resolvable at 128 px; the *ratios* between devices follow the physics
# (axial ~ pulse length ~ cycles / f, lateral ~ lambda * F# ~ F# / f).
AXIAL_PX_PER_CYCLE_MHZ = 4.0
LATERAL_PX_PER_FNUMBER_MHZ = 6.0
REFERENCE_SIZE = 128  # px; widths scale linearly with the rendered image size

# Depths (fraction of image height) at which a device's TGC control points sit.
TGC_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class OverlayStyle:
    """A manufacturer's screen furniture: depth ticks, a text block, a focus marker."""

    tick_side: str          # "left" | "right": the edge carrying depth ticks
    tick_spacing: float     # fraction of image height between ticks
    tick_length: float      # fraction of image width
    text_corner: str        # "tl" | "tr" | "bl" | "br": where the annotation text sits
    text_lines: int         # rows of glyphs in the text block
    brightness: int         # grey level of overlay graphics (0..255)
    focus_marker: bool      # a small triangle at the transmit focus depth


@dataclass(frozen=True)
class DeviceSpec:
    """One device type: the acquisition and display chain the phantom simulates."""

    name: str
    manufacturer: str
    center_mhz: float             # transmit centre frequency
    pulse_cycles: float           # pulse length in cycles (1 / fractional bandwidth)
    f_number: float               # focal depth / aperture: lateral resolution
    tgc_db: tuple[float, ...]     # gain deviation at TGC_DEPTHS from ideal compensation
    tgc_compensation: float       # fraction of the mean tissue attenuation the TGC undoes
    gain_db: float                # overall receive gain
    dynamic_range_db: float       # span of log compression mapped to 0..255
    noise_db: float               # electronic noise relative to glandular tissue echo
    compound_angles: int          # spatial compounding: number of steered frames
    steer_deg: float              # steering angle between compounded frames
    despeckle_px: float           # post-processing smoothing (Gaussian sigma at 128 px)
    gray_gamma: float             # display grey map exponent
    focus_depth: float            # transmit focus, fraction of image height
    overlay: OverlayStyle

    @property
    def psf_axial_px(self) -> float:
        """Gaussian sigma of the pulse envelope along depth, px at 128 px."""
        return AXIAL_PX_PER_CYCLE_MHZ * self.pulse_cycles / self.center_mhz

    @property
    def psf_lateral_px(self) -> float:
        """Gaussian sigma of the beam across, px at 128 px (lambda * F#)."""
        return LATERAL_PX_PER_FNUMBER_MHZ * self.f_number / self.center_mhz


_OVERLAYS: dict[str, OverlayStyle] = {
    "A": OverlayStyle("right", 0.125, 0.03, "tl", 2, 230, True),
    "B": OverlayStyle("left", 0.1, 0.04, "tr", 3, 200, False),
    "C": OverlayStyle("right", 0.2, 0.05, "bl", 1, 255, True),
    "D": OverlayStyle("left", 0.125, 0.025, "br", 2, 180, True),
    "E": OverlayStyle("right", 0.1, 0.02, "tr", 4, 210, False),
    "F": OverlayStyle("left", 0.2, 0.03, "tl", 3, 240, False),
    "G": OverlayStyle("right", 0.166, 0.04, "br", 2, 190, True),
    "H": OverlayStyle("left", 0.166, 0.05, "bl", 1, 220, True),
    "I": OverlayStyle("right", 0.25, 0.03, "tl", 5, 170, False),
}


def _device(vendor: str, probe: str, mhz: float, cycles: float, fnum: float, tgc: tuple[float, ...],
            comp: float, gain: float, dr: float, noise: float, angles: int, despeckle: float,
            gamma: float, focus: float) -> DeviceSpec:
    return DeviceSpec(
        name=f"Vendor-{vendor} {probe}", manufacturer=f"Vendor-{vendor}", center_mhz=mhz,
        pulse_cycles=cycles, f_number=fnum, tgc_db=tgc, tgc_compensation=comp, gain_db=gain,
        dynamic_range_db=dr, noise_db=noise, compound_angles=angles, steer_deg=10.0 if angles > 1 else 0.0,
        despeckle_px=despeckle, gray_gamma=gamma, focus_depth=focus, overlay=_OVERLAYS[vendor],
    )


#            vendor probe      MHz  cyc  F#   TGC deviation (dB)            comp  gain  DR   noise cmp desp gamma focus
DEVICES: tuple[DeviceSpec, ...] = (
    _device("A", "L12-5",   8.5, 2.0, 1.8, (0, 1, 2, 2, 1),         0.95, 0.0, 60, -42, 1, 0.0, 1.00, 0.45),
    _device("A", "L18-5",  12.0, 1.6, 1.6, (-1, 0, 1, 3, 5),        0.90, 2.0, 65, -38, 3, 0.0, 0.90, 0.35),
    _device("B", "LA523",   7.5, 2.2, 2.0, (2, 1, 0, -1, -2),       1.00, -2.0, 55, -45, 1, 0.5, 1.15, 0.50),
    _device("B", "LA435",  10.0, 1.8, 1.7, (0, 0, 0, 1, 2),         0.85, 1.0, 70, -40, 1, 0.0, 0.85, 0.40),
    _device("C", "ML6-15",  9.0, 2.4, 1.5, (-2, -1, 0, 1, 2),       0.95, 3.0, 50, -36, 3, 0.4, 1.10, 0.40),
    _device("C", "9L-D",    7.0, 2.0, 2.2, (1, 2, 3, 2, 0),         1.05, 0.0, 62, -44, 1, 0.0, 1.00, 0.55),
    _device("D", "eL18-4", 13.0, 1.5, 1.4, (0, -1, -2, -1, 1),      0.90, -1.0, 72, -35, 1, 0.0, 0.80, 0.30),
    _device("D", "L12-3",   8.0, 2.6, 1.9, (3, 2, 1, 0, 0),         0.95, 1.5, 58, -46, 3, 0.6, 1.20, 0.50),
    _device("E", "L14-5W",  9.5, 1.8, 1.8, (0, 2, 0, 2, 0),         0.85, 0.0, 66, -41, 1, 0.3, 1.05, 0.45),
    _device("E", "L9-3",    6.5, 2.2, 2.4, (-1, -1, 0, 0, 3),       1.00, 2.5, 54, -43, 1, 0.0, 0.95, 0.60),
    _device("F", "HL10",   10.5, 2.0, 1.6, (1, 0, -1, 0, 1),        0.90, -2.5, 60, -37, 3, 0.0, 1.00, 0.40),
    _device("F", "LV7",     7.2, 2.8, 2.1, (0, 1, 1, 1, 1),         1.05, 0.5, 68, -47, 1, 0.8, 0.90, 0.50),
    _device("G", "X15",    14.0, 1.6, 1.5, (2, 0, 0, 0, -2),        0.80, 1.0, 56, -34, 1, 0.0, 1.15, 0.35),
    _device("G", "X8",      8.0, 2.0, 2.0, (-2, 0, 2, 0, -2),       1.00, -1.5, 64, -45, 3, 0.3, 1.05, 0.45),
    _device("H", "LN-11",  11.0, 2.4, 1.7, (0, 0, 1, 2, 3),         0.95, 0.0, 52, -39, 1, 0.5, 0.85, 0.40),
    _device("H", "LN-7",    7.0, 1.8, 2.3, (1, 1, 0, -1, -1),       0.90, 2.0, 70, -44, 1, 0.0, 1.10, 0.55),
    _device("I", "Sono-12", 12.5, 2.2, 1.6, (-1, 1, 3, 1, -1),      1.00, -0.5, 62, -36, 3, 0.4, 0.95, 0.35),
    _device("I", "Sono-6",  6.0, 2.4, 2.5, (0, -2, -1, 1, 2),       0.85, 1.0, 57, -48, 1, 0.2, 1.00, 0.60),
)

_BY_NAME: dict[str, DeviceSpec] = {d.name: d for d in DEVICES}


def device_names() -> list[str]:
    """Names of all device types, in registry order (the device label vocabulary)."""
    return [d.name for d in DEVICES]


def get_device(name: str) -> DeviceSpec:
    """Look up a device by its exact name; the error lists the valid names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; valid devices are: {', '.join(_BY_NAME)}") from None
