"""Where a classifier looks: GradCAM maps and their share in lesion, margin band and surrounding tissue (Fig 5e–f).

The paper shows GradCAM [81] maps of BUS-DM and reads them qualitatively: for
TNBC the lesion margin lights up, for ALN metastasis the surrounding glandular
tissue. Here the maps come from pytorch-grad-cam, and a lesion mask splits each
image into three disjoint regions so that the reading becomes a number:

- lesion: the mask eroded by `band_px` (its core);
- margin band: the ring of width 2 x `band_px` centred on the mask boundary
  (dilation minus erosion, scipy.ndimage with a disk from skimage);
- surrounding tissue: everything outside the dilated mask.

A region's share of the saliency is read against its share of the image area
(what a uniform map would give): `enrichment` = share / area.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy import ndimage
from skimage.morphology import disk

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.stats import bootstrap_ci

REGIONS = ("lesion", "margin", "surrounding")


# --------------------------------------------------------------------------- GradCAM

def is_vit(network: torch.nn.Module) -> bool:
    """A timm vision transformer (patch tokens after `num_prefix_tokens` class/register tokens)."""
    return hasattr(network, "blocks") and hasattr(network, "patch_embed") and hasattr(network, "num_prefix_tokens")


def vit_reshape(network: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reshape transform for a ViT: drop the [CLS] (prefix) tokens, fold patch tokens (B, h*w, C) into (B, C, h, w)."""
    prefix = int(network.num_prefix_tokens)
    h, w = network.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        if patches.shape[1] != h * w:
            raise DataError(f"ViT tokens: expected {prefix} prefix + {h}x{w} patch tokens, got {tokens.shape[1]}")
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def target_layer(network: torch.nn.Module) -> torch.nn.Module:
    """GradCAM's layer: a ViT's last block's first norm (its input tokens); a CNN's last feature stage (timm)."""
    if is_vit(network):
        return network.blocks[-1].norm1
    info = getattr(network, "feature_info", None)
    if not info:
        raise UsageError(f"no GradCAM target layer known for {type(network).__name__}: pass a timm ViT or CNN")
    return network.get_submodule(info[-1]["module"])


def gradcam(network: torch.nn.Module, images: torch.Tensor, target_class: int = 1,
            layer: torch.nn.Module | None = None) -> np.ndarray:
    """(N, H, W) GradCAM maps in [0, 1] (each min–max scaled by pytorch-grad-cam) for `target_class`'s logit.

    `layer` defaults to `target_layer(network)`; a ViT's tokens are folded by `vit_reshape`.
    """
    if images.ndim != 4:
        raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    network.eval()
    reshape = vit_reshape(network) if is_vit(network) else None
    layer = target_layer(network) if layer is None else layer
    with GradCAM(model=network, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(target_class)] * len(images))


# --------------------------------------------------------------------------- regions and shares

def regions(mask: np.ndarray, band_px: int) -> dict[str, np.ndarray]:
    """Disjoint lesion core, margin band (2 x `band_px` wide, on the boundary) and surrounding tissue of one mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise DataError(f"a lesion mask must be a non-empty 2-D array, got shape {mask.shape} with "
                        f"{int(mask.sum())} lesion pixels")
    if band_px < 1:
        raise UsageError(f"band_px must be at least 1 pixel, got {band_px}")
    ball = disk(band_px).astype(bool)
    core = ndimage.binary_erosion(mask, ball)
    grown = ndimage.binary_dilation(mask, ball)
    return {"lesion": core, "margin": grown & ~core, "surrounding": ~grown}


def region_shares(saliency: np.ndarray, mask: np.ndarray, band_px: int) -> dict[str, float]:
    """Share of the saliency and of the image area in each region, and their ratio (enrichment)."""
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.shape != np.shape(mask):
        raise DataError(f"saliency map {saliency.shape} and lesion mask {np.shape(mask)} differ in shape: "
                        "resize the mask to the classifier's input size")
    if (saliency < 0).any() or saliency.sum() <= 0:
        raise DataError("a saliency map must be non-negative with some positive mass")
    out = {}
    for name, region in regions(mask, band_px).items():
        share, area = saliency[region].sum() / saliency.sum(), region.mean()
        out |= {f"{name}_share": float(share), f"{name}_area": float(area),
                f"{name}_enrichment": float(share / area) if area > 0 else float("nan")}
    return out


def share_table(saliency: np.ndarray, masks: np.ndarray, band_px: int) -> pd.DataFrame:
    """One row of `region_shares` per image of (N, H, W) saliency maps and lesion masks.

    GradCAM's final ReLU leaves an all-zero map where no activation speaks for
    the target class; such a map has no shares to split, so its row is NaN with
    `empty_map` True (counted, not silently averaged as zeros).
    """
    saliency, masks = np.asarray(saliency), np.asarray(masks)
    if len(saliency) != len(masks):
        raise DataError(f"{len(saliency)} saliency maps but {len(masks)} lesion masks: one mask per image")
    rows = []
    for s, m in zip(saliency, masks):
        empty = not (s < 0).any() and s.sum() == 0
        rows.append({"empty_map": empty} if empty else {**region_shares(s, m, band_px), "empty_map": False})
    return pd.DataFrame(rows)


def summarise_shares(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per region: mean saliency share over the images with a non-empty map, with a bootstrap CI, and the mean
    area share beside it; `n` counts the images used, `n_empty` those whose map was all zero."""
    empty = table["empty_map"].astype(bool) if "empty_map" in table else pd.Series(False, index=table.index)
    used = table[~empty]
    if used.empty:
        raise DataError(f"all {len(table)} saliency maps are empty: the model shows no evidence for the target class")
    rows = []
    for name in REGIONS:
        share, lo, hi = bootstrap_ci(np.mean, used[f"{name}_share"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append({"region": name, "saliency_share": share, "lo": lo, "hi": hi,
                     "area_share": float(used[f"{name}_area"].mean()), "n": len(used), "n_empty": int(empty.sum())})
    return pd.DataFrame(rows)
