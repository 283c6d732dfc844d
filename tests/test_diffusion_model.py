"""The conditional UNet and its condition encoders: shapes, sizes, and where the conditions go."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from busgen_lib.data.dataset import boxes_to_mask
from busgen_lib.diffusion.model import (
    ARCHITECTURE,
    BUSGenUNet,
    build_model,
    config_for_profile,
    count_parameters,
    model_settings,
)

DEVICES = tuple(f"device-{i}" for i in range(18))
BOX_MODES = ("mask", "embedding", "both")
COND_KEYS = ("pathology", "device", "boxes", "box_valid", "box_mask")


def make_cond(batch: int, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, 4, 2, generator=g) * 0.5
    boxes = torch.cat((corner, corner + 0.1 + 0.4 * torch.rand(batch, 4, 2, generator=g)), dim=-1)
    valid = torch.tensor([[True, True, False, False]] * batch)
    valid[0] = False  # one sample without lesion
    boxes = torch.where(valid[..., None], boxes, 0.0)
    return {
        "pathology": torch.randint(1, 4, (batch,), generator=g),
        "device": torch.randint(1, len(DEVICES) + 1, (batch,), generator=g),
        "boxes": boxes,
        "box_valid": valid,
        "box_mask": boxes_to_mask(boxes, size)[:, None],
    }


def null_cond(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "pathology": torch.zeros_like(cond["pathology"]),
        "device": torch.zeros_like(cond["device"]),
        "boxes": cond["boxes"],
        "box_valid": torch.zeros_like(cond["box_valid"]),
        "box_mask": torch.zeros_like(cond["box_mask"]),
    }


@pytest.fixture(scope="module", params=BOX_MODES)
def smoke_model(request):
    torch.manual_seed(0)
    return build_model("smoke", DEVICES, box_mode=request.param).eval()


def test_output_is_noise_shaped_for_every_box_mode(smoke_model):
    x = torch.randn(3, 1, 32, 32)
    eps = smoke_model(x, torch.tensor([0, 250, 499]), **make_cond(3))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert smoke_model.unet.config.in_channels == (2 if smoke_model.config.box_mode != "embedding" else 1)


# --------------------------------------------------------------------------- sizes

def test_paper_model_has_the_reference_parameter_budget():
    n = count_parameters(build_model("paper", DEVICES + ("extra",)))  # the reference knows 19 devices
    print(f"paper UNet + condition encoders: {n / 1e6:.2f}M parameters")
    assert abs(n - 48e6) <= 0.10 * 48e6


def test_demo_model_is_about_three_million_parameters():
    n = count_parameters(build_model("demo", DEVICES))
    print(f"demo: {n / 1e6:.2f}M parameters")
    assert abs(n - 3e6) <= 0.20 * 3e6


def test_smoke_model_is_tiny():
    assert count_parameters(build_model("smoke", DEVICES)) < 0.5e6


# --------------------------------------------------------------------------- conditions and dropout

def test_force_dropped_conditions_give_exactly_the_null_output(smoke_model):
    x, t, cond = torch.randn(4, 1, 32, 32), torch.full((4,), 100), make_cond(4)
    with torch.no_grad():
        dropped = smoke_model(x, t, **cond, force_drop=torch.ones(4, dtype=torch.bool))
        explicit_null = smoke_model(x, t, **null_cond(cond))
        conditional = smoke_model(x, t, **cond)
    assert torch.equal(dropped, explicit_null)
    assert not torch.allclose(conditional, explicit_null, atol=1e-4)  # the conditions do act


def test_force_drop_touches_only_the_marked_samples(smoke_model):
    x, t, cond = torch.randn(4, 1, 32, 32), torch.full((4,), 100), make_cond(4)
    force = torch.tensor([False, True, False, True])
    with torch.no_grad():
        mixed = smoke_model(x, t, **cond, force_drop=force)
        conditional = smoke_model(x, t, **cond)
        explicit_null = smoke_model(x, t, **null_cond(cond))
    torch.testing.assert_close(mixed[~force], conditional[~force], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[force], explicit_null[force], rtol=0, atol=1e-6)


@pytest.mark.parametrize("box_mode", BOX_MODES)
def test_training_dropout_with_p_one_reaches_the_null_embedding(box_mode):
    torch.manual_seed(0)
    model = build_model("smoke", DEVICES, box_mode=box_mode, p_uncond=1.0)
    x, t, cond = torch.randn(4, 1, 32, 32), torch.full((4,), 300), make_cond(4)
    null = null_cond(cond)
    with torch.no_grad():
        emb_dropped, mask_dropped = model.conditions.train()(*(cond[k] for k in COND_KEYS))
        emb_null, mask_null = model.conditions.eval()(*(null[k] for k in COND_KEYS))
        trained = model.train()(x, t, **cond)
        explicit_null = model.eval()(x, t, **null)
    assert torch.equal(emb_dropped, emb_null)
    assert (mask_dropped is None and mask_null is None) or torch.equal(mask_dropped, mask_null)
    # same embedding; the UNet itself may pick other kernels in training mode (differences ~1e-6)
    torch.testing.assert_close(trained, explicit_null, rtol=0, atol=1e-5)


@pytest.mark.parametrize("independent", [False, True])
def test_training_dropout_rate_is_p_jointly_or_per_condition(independent):
    encoder = build_model("smoke", DEVICES, independent_drop=independent).conditions.train()
    n, p = 40_000, encoder.p_uncond
    torch.manual_seed(1)
    drop = encoder.drop_masks(n, torch.device("cpu"), None).float()
    tol = 5 * (p * (1 - p) / n) ** 0.5
    assert torch.all((drop.mean(dim=1) - p).abs() < tol)
    together = (drop[0] == drop[1]) & (drop[1] == drop[2])
    if independent:
        assert together.float().mean() < 0.9  # independent coins disagree in ≈ 27% of samples
    else:
        assert together.all()


def test_evaluation_mode_drops_nothing_without_force_drop():
    encoder = build_model("smoke", DEVICES).conditions.eval()
    assert not encoder.drop_masks(1000, torch.device("cpu"), None).any()


def test_box_embedding_reads_valid_boxes_only():
    torch.manual_seed(0)
    model = build_model("smoke", DEVICES, box_mode="embedding").eval()
    x, t, cond = torch.randn(4, 1, 32, 32), torch.full((4,), 50), make_cond(4)
    padded = dict(cond, boxes=torch.where(cond["box_valid"][..., None], cond["boxes"], torch.rand(4, 4, 4)))
    moved = dict(cond, boxes=torch.where(cond["box_valid"][..., None], cond["boxes"] * 0.5, cond["boxes"]))
    with torch.no_grad():
        base, with_padding, with_moved = (model(x, t, **c) for c in (cond, padded, moved))
    assert torch.equal(base, with_padding)  # padding slots never count
    assert torch.equal(base[0], with_moved[0])  # sample 0 has no valid box
    assert not torch.allclose(base[1:], with_moved[1:], atol=1e-5)


def test_missing_box_mask_is_rasterised_from_the_valid_boxes():
    torch.manual_seed(0)
    model = build_model("smoke", DEVICES, box_mode="mask").eval()
    x, t, cond = torch.randn(4, 1, 32, 32), torch.full((4,), 50), make_cond(4)
    with torch.no_grad():
        given = model(x, t, **cond)
        derived = model(x, t, **dict(cond, box_mask=None))
    assert torch.equal(given, derived)


def test_condition_embedding_reaches_every_residual_block(smoke_model):
    """Every ResnetBlock2D receives temb = time embedding + condition embedding (UNet2DModel, class_embed_type identity)."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("temb", args[1] if len(args) > 1 else None)),
                                         with_kwargs=True)
             for m in smoke_model.modules() if isinstance(m, ResnetBlock2D)]
    x, t, cond = torch.randn(2, 1, 32, 32), torch.full((2,), 10), make_cond(2)
    try:
        with torch.no_grad():
            smoke_model(x, t, **cond)
            expected = smoke_model.unet.time_embedding(smoke_model.unet.time_proj(t)) + smoke_model.conditions(
                cond["pathology"], cond["device"], cond["boxes"], cond["box_valid"], cond["box_mask"])[0]
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(hooks) > 0
    for temb in seen:
        torch.testing.assert_close(temb, expected)


# --------------------------------------------------------------------------- config

def test_model_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = build_model("smoke", DEVICES, box_mode="both")
    model.save_pretrained(tmp_path / "m")
    again = BUSGenUNet.from_pretrained(tmp_path / "m")
    stored = model_settings(again)
    assert stored == model_settings(model)
    # the profile's arguments, as JSON keeps them (tuples as lists)
    given = json.loads(json.dumps(config_for_profile("smoke", DEVICES, box_mode="both")))
    assert {k: stored[k] for k in given} == given and given["box_mode"] == "both"
    assert stored["architecture"] == ARCHITECTURE
    assert again.unet.config.in_channels == 2 and len(again.config.device_names) == 18
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_config_refuses_another_architecture():
    with pytest.raises(ValueError, match="architecture"):
        build_model("smoke", DEVICES, architecture="something-else")
