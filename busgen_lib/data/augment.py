"""The paper's strong conventional augmentations (§4.3.2): random crop, colour jitter, random flip.

Images are grayscale tensors (C, H, W) float in [0, 1] (C = 1 for B-mode); boxes
are a float tensor (N, 4) of relative [x0, y0, x1, y1]. Image and boxes move
together, so the box conditions always point at the lesion the image shows.

Output geometry: the (cropped) image is resized to size x size. The aspect
ratio is therefore *not* preserved — neither by the crop (each side is scaled
independently) nor by the resize — which is what the square training resolution
of the reference code does too. Relative boxes are unchanged by a resize; that is
why the manifest stores them relative.

All randomness comes from an explicit `torch.Generator`, so a sample's
augmentation is a pure function of its seed (see `BUSDataset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Tunables of `augment`; the defaults are moderate, label-preserving ranges."""

    min_crop_scale: float = 0.6                  # smallest crop side as a fraction of the image side
    flip_p: float = 0.5                          # probability of a horizontal flip
    brightness: tuple[float, float] = (0.8, 1.2)  # multiplicative brightness factor range
    contrast: tuple[float, float] = (0.8, 1.2)    # contrast factor range (blend with the mean)
    gamma: tuple[float, float] = (0.8, 1.25)      # gamma exponent range

    def __post_init__(self) -> None:
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale must lie in (0, 1], got {self.min_crop_scale}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must lie in [0, 1], got {self.flip_p}")
        for name in ("brightness", "contrast", "gamma"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {(lo, hi)}")


# Named presets. "strong" is the paper's adaptation augmentation (random crop, colour jitter, random flip;
# §4.3.2). "device" keeps what identifies the scanner: no grey-level jitter (gain, dynamic range and grey
# map are device traits), crops of at least 90% (speckle grain size is one too) and no flip (real overlays
# are never mirrored). Pretraining, which the paper does not say it augments, uses "device", so that the
# device condition is learnable; with "strong", device control of a demo model stayed at chance.
AUGMENTATIONS: dict[str, AugmentConfig] = {
    "strong": AugmentConfig(),
    "device": AugmentConfig(min_crop_scale=0.9, flip_p=0.0, brightness=(1.0, 1.0), contrast=(1.0, 1.0),
                            gamma=(1.0, 1.0)),
}


def get_augmentation(name: str) -> AugmentConfig:
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}") from None


# --------------------------------------------------------------------------- sampling helpers

def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """Integer uniform on the closed range [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _crop_span(length: int, lo: int, hi: int, min_scale: float, generator: torch.Generator) -> tuple[int, int]:
    """Sample (start, extent) of a crop along one axis of `length` px that contains [lo, hi).

    The extent is at least `min_scale * length`, or the boxes' span where that is
    larger ("crop only as much as the boxes allow"); the start then slides within
    the slack the boxes leave. With no boxes, pass lo=length, hi=0.
    """
    extent = _randint(max(math.ceil(min_scale * length), hi - lo, 1), length, generator)
    start = _randint(max(0, hi - extent), min(lo, length - extent), generator)
    return start, extent


# --------------------------------------------------------------------------- geometric steps

def random_box_preserving_crop(
    image: torch.Tensor, boxes: torch.Tensor, min_scale: float, generator: torch.Generator
) -> tuple[int, int, int, int, torch.Tensor]:
    """Pick a pixel crop (top, left, height, width) that keeps every box whole; return it and the boxes in it.

    Hand-written rather than torchvision's v2.RandomIoUCrop, which only bounds the
    IoU of boxes with the crop and may cut a lesion in half — the box condition
    would then describe a lesion the image no longer shows.
    """
    height, width = image.shape[-2:]
    if len(boxes):
        left_px, top_px = math.floor(boxes[:, 0].min() * width), math.floor(boxes[:, 1].min() * height)
        right_px, bottom_px = math.ceil(boxes[:, 2].max() * width), math.ceil(boxes[:, 3].max() * height)
    else:
        left_px, top_px, right_px, bottom_px = width, height, 0, 0
    top, crop_h = _crop_span(height, top_px, bottom_px, min_scale, generator)
    left, crop_w = _crop_span(width, left_px, right_px, min_scale, generator)
    scale = boxes.new_tensor([width / crop_w, height / crop_h, width / crop_w, height / crop_h])
    offset = boxes.new_tensor([left / width, top / height, left / width, top / height])
    return top, left, crop_h, crop_w, ((boxes - offset) * scale).clamp(0.0, 1.0)


def flip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Relative boxes under a horizontal flip: x0' = 1 - x1, x1' = 1 - x0."""
    return torch.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], dim=1)


# --------------------------------------------------------------------------- public API

def jitter_intensity(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and gamma jitter ("colour jittering" for grayscale); geometry untouched."""
    image = F.adjust_brightness(image, _uniform(*config.brightness, generator))
    image = F.adjust_contrast(image, _uniform(*config.contrast, generator))
    return F.adjust_gamma(image, _uniform(*config.gamma, generator)).clamp(0.0, 1.0)


def augment(
    image: torch.Tensor, boxes: torch.Tensor, size: int, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training view of (image, boxes): box-preserving crop, resize to size x size, flip, intensity jitter.

    The crop depends only on the boxes and the image shape (never on pixel values),
    so two calls with equally seeded generators crop identically.
    """
    boxes = boxes.reshape(-1, 4).to(torch.float32)
    top, left, crop_h, crop_w, boxes = random_box_preserving_crop(image, boxes, config.min_crop_scale, generator)
    image = F.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True)
    if torch.rand((), generator=generator).item() < config.flip_p:
        image, boxes = F.horizontal_flip(image), flip_boxes(boxes)
    return jitter_intensity(image, config, generator), boxes


def prepare(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation view of (image, boxes): the whole image resized to size x size, no randomness."""
    image = F.resize(image, [size, size], antialias=True).clamp(0.0, 1.0)
    return image, boxes.reshape(-1, 4).to(torch.float32)
