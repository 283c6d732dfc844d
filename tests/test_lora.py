"""LoRA adaptation: a frozen base, adapters that train alone, load only onto their base, and merge exactly."""

import pytest
import torch

from busgen_lib.cli import main
from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.diffusion import lora
from busgen_lib.diffusion.checkpoint import WEIGHTS_FILE, load_model
from busgen_lib.diffusion.lora import (ADAPTER_WEIGHTS_FILE, AdapterConfig, adapt, add_adapter, base_fingerprint,
                                       load_adapted_model, load_adapter, merge_adapter, save_adapter, use_adapter)

STEPS = dict(steps=4, batch_size=4, checkpoint_every=2, warmup_steps=1, log_every=1)


def _inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    boxes = torch.tensor([[0.2, 0.3, 0.6, 0.7]]).repeat(batch, model.config.max_boxes, 1)
    valid = torch.zeros(batch, model.config.max_boxes, dtype=torch.bool)
    valid[:, 0] = True
    return dict(x_t=torch.randn(batch, 1, size, size, generator=g), t=torch.tensor([3, 100, 400]),
                pathology=torch.tensor([1, 2, 3]), device=torch.tensor([0, 1, 2]), boxes=boxes, box_valid=valid)


def _randomise_adapter(model, name, seed):
    """A trained-looking adapter: B != 0, so it really changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n or f"lora_A.{name}." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture
def base(smoke_model):
    return load_model(smoke_model).eval()


def test_untrained_adapter_is_identity_and_only_adapter_parameters_train(base):
    inputs = _inputs(base)
    reference = base(**inputs)
    add_adapter(base, "dcis", AdapterConfig(rank=4))
    assert torch.equal(base(**inputs), reference)  # B = 0 at initialisation
    base.train()
    base(**inputs).square().mean().backward()
    for name, p in base.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            assert p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert {n.split(".")[-1] for n, _ in lora._tuner_layers(base)} >= {"to_q", "conv1", "time_emb_proj", "2"}


def test_targets_are_selectable(base):
    add_adapter(base, "attn", AdapterConfig(targets=("attention",)))
    kinds = {n.split(".")[-1] for n, _ in lora._tuner_layers(base)}
    assert kinds == {"to_q", "to_k", "to_v", "0"}
    with pytest.raises(ValueError, match="subset"):
        AdapterConfig(targets=("everything",))


def test_merged_adapter_gives_the_unmerged_outputs_and_leaves_a_plain_model(base, smoke_model):
    inputs = _inputs(base)
    with torch.no_grad():
        plain = base(**inputs)
        add_adapter(base, "a", AdapterConfig(rank=4, alpha=8))
        _randomise_adapter(base, "a", seed=1)
        unmerged = base(**inputs)
        merged_model = merge_adapter(base, "a").eval()
        merged = merged_model(**inputs)
    assert not lora._tuner_layers(merged_model)
    assert set(merged_model.state_dict()) == set(load_model(smoke_model).state_dict())
    assert not torch.allclose(unmerged, plain, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(merged, unmerged, atol=2e-5, rtol=1e-4)


def test_named_adapters_live_side_by_side_and_switch(base):
    inputs = _inputs(base)
    with torch.no_grad():
        plain = base(**inputs)
        add_adapter(base, "dcis")
        _randomise_adapter(base, "dcis", seed=1)
        add_adapter(base, "tnbc")
        _randomise_adapter(base, "tnbc", seed=2)
        out = {}
        for name in ("dcis", "tnbc", None):
            use_adapter(base, name)
            out[name] = base(**inputs)
    assert torch.equal(out[None], plain)
    assert not torch.allclose(out["dcis"], out["tnbc"], atol=1e-4)
    with pytest.raises(ValueError, match="no adapter named 'idc'"):
        use_adapter(base, "idc")
    with pytest.raises(ValueError, match="already has an adapter named 'dcis'"):
        add_adapter(base, "dcis")


def test_saved_adapter_is_small_reloads_exactly_and_refuses_another_base(base, smoke_model, tmp_path):
    add_adapter(base, "dcis", AdapterConfig(rank=2))
    _randomise_adapter(base, "dcis", seed=3)
    inputs = _inputs(base)
    with torch.no_grad():
        expected = base(**inputs)
    folder = save_adapter(base, "dcis", tmp_path / "dcis", base=str(smoke_model))
    size = (folder / ADAPTER_WEIGHTS_FILE).stat().st_size
    assert size < 0.2 * (smoke_model / WEIGHTS_FILE).stat().st_size

    fresh = load_model(smoke_model).eval()
    assert load_adapter(fresh, folder) == "dcis"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs), expected, atol=0, rtol=0)

    other = load_model(smoke_model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="trained on another base model"):
        load_adapter(other, folder)


def test_adapt_trains_the_adapter_only_resumes_exactly_and_samples(smoke_model, tiny_phantom, tmp_path):
    before = base_fingerprint(load_model(smoke_model))
    folder = adapt(smoke_model, tiny_phantom, "few", tmp_path / "run", train_overrides=STEPS, progress=False)
    adapted = load_adapted_model(smoke_model, folder, merge=False)
    assert base_fingerprint(adapted) == before  # the base is bit-identical after adaptation
    assert base_fingerprint(load_model(smoke_model)) == before
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    assert (folder / "box_prior.json").exists()

    # killed after the step-2 checkpoint, resumed: the same adapter as the straight run
    calls = {"n": 0}
    real_loss = lora.fit.__globals__["diffusion_loss"]

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    lora.fit.__globals__["diffusion_loss"] = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            adapt(smoke_model, tiny_phantom, "few", tmp_path / "killed", train_overrides=STEPS, progress=False)
    finally:
        lora.fit.__globals__["diffusion_loss"] = real_loss
    resumed = adapt(smoke_model, tiny_phantom, "few", tmp_path / "killed", resume=True, train_overrides=STEPS,
                    progress=False)
    straight = load_adapted_model(smoke_model, folder, merge=False).state_dict()
    again = load_adapted_model(smoke_model, resumed, merge=False).state_dict()
    assert all(torch.equal(straight[k], again[k]) for k in straight)

    out = tmp_path / "gen"
    assert main(["sample", "--model", str(smoke_model), "--adapter", str(folder), "--n", "3", "--out", str(out),
                 "--steps", "2"]) == 0
    assert len(list((out / "images").rglob("*.png"))) == 3


def test_adapt_cli_and_unknown_device_error(smoke_model, tiny_phantom, tmp_path):
    df = read_manifest(tiny_phantom)
    df.loc[df.index[0], "device"] = "Brand-New X1"
    bad = write_manifest(df, tmp_path / "manifest.csv")
    with pytest.raises(ValueError, match="Brand-New X1"):
        adapt(smoke_model, bad, "x", tmp_path / "r", train_overrides=STEPS, progress=False)
    assert main(["adapt", "--model", str(smoke_model), "--manifest", str(tiny_phantom), "--adapter", "cli",
                 "--out", str(tmp_path / "cli"), "--steps", "2"]) == 0
    assert (tmp_path / "cli" / "adapter" / ADAPTER_WEIGHTS_FILE).exists()


def test_adapter_folder_is_peft_format_and_a_foreign_or_incomplete_one_is_named(base, smoke_model, tmp_path):
    from peft import PeftConfig, get_peft_model_state_dict
    from peft.utils import load_peft_weights
    from safetensors.torch import load_file, save_file

    from busgen_lib.errors import DataError

    add_adapter(base, "dcis", AdapterConfig(rank=2, targets=("attention",)))
    _randomise_adapter(base, "dcis", seed=1)
    folder = save_adapter(base, "dcis", tmp_path / "dcis", base=str(smoke_model))
    # peft's own readers understand the folder
    config = PeftConfig.from_pretrained(str(folder))
    assert (config.peft_type, config.r, config.base_model_name_or_path) == ("LORA", 2, str(smoke_model))
    stored, live = load_peft_weights(str(folder), device="cpu"), get_peft_model_state_dict(base, adapter_name="dcis")
    assert stored.keys() == live.keys() and all(torch.equal(stored[k], live[k]) for k in live)

    fresh = load_model(smoke_model)
    save_file(load_file(folder / ADAPTER_WEIGHTS_FILE), folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(DataError, match="no base-model fingerprint"):  # written by peft, not save_adapter
        load_adapter(fresh, folder)
    (folder / ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(DataError, match="weights file not found; the adapter folder is incomplete"):
        load_adapter(fresh, folder)
    with pytest.raises(DataError, match="no adapter_config.json; is this a busgen adapter folder"):
        load_adapter(fresh, tmp_path)


def test_a_finished_adaptation_is_returned_as_it_is(smoke_model, tiny_phantom, tmp_path, monkeypatch):
    """Notebooks call adapt on every run; generated sets stamped with the adapter's digest must stay valid."""
    folder = adapt(smoke_model, tiny_phantom, "few", tmp_path / "run", train_overrides=STEPS, progress=False)
    saved = (folder / ADAPTER_WEIGHTS_FILE).read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished adaptation was trained again")

    monkeypatch.setattr(lora, "fit", no_training)
    again = adapt(smoke_model, tiny_phantom, "few", tmp_path / "run", resume=True, train_overrides=STEPS,
                  progress=False)
    assert again == folder and (again / ADAPTER_WEIGHTS_FILE).read_bytes() == saved
    from busgen_lib.errors import UsageError

    with pytest.raises(UsageError, match="other settings"):  # the settings are still checked before the return
        adapt(smoke_model, tiny_phantom, "few", tmp_path / "run", resume=True,
              train_overrides=STEPS | {"steps": STEPS["steps"] + 2}, progress=False)
