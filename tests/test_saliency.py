"""GradCAM maps and their shares in lesion / margin band / surrounding tissue (Fig 5e–f)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.saliency import (gradcam, region_shares, regions, share_table, summarise_shares,
                                          target_layer, vit_reshape)

SIZE = 30


def square_mask(top: int = 10, side: int = 10, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, top:top + side] = True
    return mask


# --------------------------------------------------------------------------- regions and shares

def test_regions_of_a_square_match_hand_counts():
    # disk(1) is the 3x3 cross: the 10x10 square erodes to 8x8 and dilates to 12x12 less its 4 corners
    r = regions(square_mask(), band_px=1)
    assert [int(r[k].sum()) for k in ("lesion", "margin", "surrounding")] == [64, 140 - 64, SIZE * SIZE - 140]
    assert not (r["lesion"] & r["margin"]).any() and not (r["margin"] & r["surrounding"]).any()


def test_saliency_on_the_margin_band_only_is_all_margin():
    mask = square_mask()
    ring = regions(mask, band_px=2)["margin"]
    shares = region_shares(ring.astype(float), mask, band_px=2)
    assert shares["margin_share"] == pytest.approx(1.0)
    assert shares["lesion_share"] == 0 and shares["surrounding_share"] == 0
    assert shares["margin_enrichment"] == pytest.approx(1 / ring.mean())


def test_uniform_saliency_has_shares_equal_to_areas():
    shares = region_shares(np.ones((SIZE, SIZE)), square_mask(), band_px=2)
    for name in ("lesion", "margin", "surrounding"):
        assert shares[f"{name}_share"] == pytest.approx(shares[f"{name}_area"])
        assert shares[f"{name}_enrichment"] == pytest.approx(1.0)


def test_summary_gives_mean_shares_with_intervals():
    rng = np.random.default_rng(0)
    maps = rng.random((12, SIZE, SIZE))
    masks = np.stack([square_mask(top=int(t)) for t in rng.integers(5, 15, 12)])
    table = share_table(maps, masks, band_px=2)
    summary = summarise_shares(table, n_boot=200).set_index("region")
    assert summary["saliency_share"].sum() == pytest.approx(1.0)
    assert summary.loc["lesion", "saliency_share"] == pytest.approx(table["lesion_share"].mean())
    assert ((summary["lo"] <= summary["saliency_share"]) & (summary["saliency_share"] <= summary["hi"])).all()


def test_an_all_zero_map_is_counted_apart_not_averaged_as_zero_shares():
    """GradCAM's ReLU can leave nothing: such an image has no shares, and the summary says how many there were."""
    rng = np.random.default_rng(1)
    maps = rng.random((5, SIZE, SIZE))
    maps[2] = 0.0
    masks = np.stack([square_mask()] * 5)
    table = share_table(maps, masks, band_px=2)
    assert table["empty_map"].tolist() == [False, False, True, False, False]
    assert np.isnan(table.loc[2, "lesion_share"])
    summary = summarise_shares(table, n_boot=100).set_index("region")
    kept = table.drop(index=2)
    assert summary.loc["lesion", "saliency_share"] == pytest.approx(kept["lesion_share"].mean())
    assert summary.loc["margin", "area_share"] == pytest.approx(kept["margin_area"].mean())
    assert (summary["n"] == 4).all() and (summary["n_empty"] == 1).all()
    with pytest.raises(DataError, match="all 1 saliency maps are empty"):
        summarise_shares(share_table(np.zeros((1, SIZE, SIZE)), masks[:1], band_px=2))
    with pytest.raises(DataError, match="some positive mass"):  # a single map still has to have some
        region_shares(np.zeros((SIZE, SIZE)), square_mask(), band_px=2)


def test_refusals_name_the_problem():
    with pytest.raises(DataError, match="differ in shape"):
        region_shares(np.ones((SIZE, SIZE)), square_mask(size=SIZE + 2), band_px=1)
    with pytest.raises(DataError, match="non-empty"):
        region_shares(np.ones((SIZE, SIZE)), np.zeros((SIZE, SIZE), bool), band_px=1)
    with pytest.raises(DataError, match="non-negative"):
        region_shares(-np.ones((SIZE, SIZE)), square_mask(), band_px=1)
    with pytest.raises(UsageError, match="band_px"):
        regions(square_mask(), band_px=0)
    with pytest.raises(DataError, match="one mask per image"):
        share_table(np.ones((3, SIZE, SIZE)), np.ones((2, SIZE, SIZE), bool), band_px=1)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        gradcam(_evidence_model(), torch.zeros(1, SIZE, SIZE))


# --------------------------------------------------------------------------- GradCAM

def _evidence_model() -> torch.nn.Sequential:
    """A CNN whose positive-class evidence is the image's brightness: GradCAM must equal relu(image), rescaled."""
    conv = torch.nn.Conv2d(1, 1, 1)
    head = torch.nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0), conv.bias.zero_()
        head.weight.copy_(torch.tensor([[-1.0], [1.0]])), head.bias.zero_()
    return torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)


def test_gradcam_finds_the_known_evidence_and_its_shares():
    mask = square_mask()
    image = torch.from_numpy(np.where(mask, 1.0, 0.0)).float()[None, None]
    model = _evidence_model()
    cam = gradcam(model, image, target_class=1, layer=model[0])
    assert cam.shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(cam[0], mask.astype(float), atol=1e-5)
    shares = share_table(cam, mask[None], band_px=1).iloc[0]
    # all saliency on the mask: its 8x8 core (lesion) and its inner ring of 36 pixels (margin band)
    assert shares["lesion_share"] == pytest.approx(64 / 100, abs=1e-4)
    assert shares["margin_share"] == pytest.approx(36 / 100, abs=1e-4)
    assert shares["surrounding_share"] == pytest.approx(0, abs=1e-4)


def _tiny_vit(**kwargs) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, in_chans=1, img_size=32,
                             patch_size=8, depth=1, embed_dim=16, num_heads=2, **kwargs)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_vit_reshape_drops_the_prefix_tokens_and_folds_patches_row_major(reg_tokens):
    vit = _tiny_vit(reg_tokens=reg_tokens)
    prefix = 1 + reg_tokens
    tokens = torch.arange(2 * (prefix + 16) * 3, dtype=torch.float32).reshape(2, prefix + 16, 3)
    grid = vit_reshape(vit)(tokens)
    assert grid.shape == (2, 3, 4, 4)
    for i, j in [(0, 0), (0, 3), (2, 1), (3, 3)]:  # patch (i, j) is token prefix + 4 i + j (timm flattens rows)
        assert torch.equal(grid[1, :, i, j], tokens[1, prefix + 4 * i + j])
    with pytest.raises(DataError, match="patch tokens"):
        vit_reshape(vit)(tokens[:, :-1])


def test_vit_patch_order_matches_timms_patch_embedding():
    vit = _tiny_vit()
    image = torch.zeros(1, 1, 32, 32)
    image[..., 8:16, 24:32] = 1.0  # patch row 1, column 3
    with torch.no_grad():
        vit.patch_embed.proj.weight.fill_(1.0), vit.patch_embed.proj.bias.zero_()
        patches = vit.patch_embed(image)  # (1, 16, C)
    folded = vit_reshape(vit)(torch.cat([torch.zeros(1, 1, patches.shape[2]), patches], dim=1))
    hot = folded[0, 0].nonzero().tolist()
    assert hot == [[1, 3]]


def test_gradcam_on_a_tiny_vit_and_a_timm_cnn_gives_unit_maps():
    torch.manual_seed(0)
    images = torch.randn(3, 1, 32, 32)
    vit = _tiny_vit()
    assert target_layer(vit) is vit.blocks[-1].norm1
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=2, in_chans=1)
    assert target_layer(cnn) is cnn.layer4
    for model in (vit, cnn):
        cam = gradcam(model, images)
        assert cam.shape == (3, 32, 32) and cam.min() >= 0 and cam.max() <= 1 + 1e-6
    with pytest.raises(UsageError, match="no GradCAM target layer"):
        target_layer(torch.nn.Linear(2, 2))
