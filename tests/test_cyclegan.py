"""CycleGAN device translation: network geometry, losses, the image pool, learning, exact resumption, translators."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import busgen_lib.devices.cyclegan as cg
from busgen_lib.data.manifest import read_manifest
from busgen_lib.devices.cyclegan import (
    CycleGAN, CycleGANConfig, ImagePool, PatchDiscriminator, ResnetGenerator, cyclegan_config, lsgan_loss,
    patchgan_specs, receptive_field, train_cyclegan,
)
from busgen_lib.devices.translate import DeviceTranslators, augment_manifest, device_slug
from busgen_lib.evaluate.translation import phantom_renderer
from busgen_lib.data.dataset import load_images


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- synthetic unpaired domains

S = 16
ROWS = (1 - 2 * (torch.arange(S) % 2)).float()[:, None]  # +1 / -1 on alternate rows


def domain(n: int, striped: bool, seed: int) -> torch.Tensor:
    """A: dark images with one bright blob. B: the same kind of content, brighter, with horizontal stripes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
    cy, cx = torch.rand(2, n, 1, 1, generator=g) * (S - 6) + 3
    r = 1.5 + 1.5 * torch.rand(n, 1, 1, generator=g)
    image = -0.6 + 0.8 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
    if striped:
        image = image + 0.5 + 0.25 * ROWS
    return (image + 0.03 * torch.randn(n, S, S, generator=g)).clamp(-1, 1)[:, None]


def stripe_energy(x: torch.Tensor) -> float:
    return float((x[:, 0] * ROWS).mean(dim=(1, 2)).abs().mean())


def tiny_config(**overrides) -> CycleGANConfig:
    values = dict(image_size=S, ngf=8, n_blocks=1, ndf=8, n_layers=1, steps=60, batch_size=4, learning_rate=2e-3,
                  checkpoint_every=1000)
    return CycleGANConfig(**{**values, **overrides})


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- networks

def test_generator_keeps_the_image_shape_at_any_multiple_of_four():
    g = ResnetGenerator(ngf=8, n_blocks=2)  # its range is its final tanh's: nothing to test there
    for size in (32, 44):
        assert g(torch.randn(3, 1, size, size)).shape == (3, 1, size, size)


def test_discriminator_gives_one_logit_per_patch():
    # Reference shapes: 256 px -> 30 x 30 patches for the 3-layer net; each stride-2 layer halves the map.
    assert PatchDiscriminator(ndf=8, n_layers=3)(torch.zeros(2, 1, 256, 256)).shape == (2, 1, 30, 30)
    assert PatchDiscriminator(ndf=8, n_layers=2)(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 14, 14)
    assert cg.patch_output_size(64, 2) == 14


def test_three_layer_patchgan_sees_70x70_patches():
    net = PatchDiscriminator(ndf=8, n_layers=3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0]) for m in convs] == patchgan_specs(3)
    assert [m.out_channels for m in convs] == [8, 16, 32, 64, 1]  # C64-C128-C256-C512 at ndf 64
    # Forward recursion over the module's own convs: rf += (k - 1) * jump, jump *= stride.
    rf, jump = 1, 1
    for m in convs:
        rf += (m.kernel_size[0] - 1) * jump
        jump *= m.stride[0]
    assert rf == receptive_field(patchgan_specs(3)) == 70
    assert receptive_field(patchgan_specs(2)) == 34


def test_config_refuses_sizes_the_networks_cannot_take():
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_config(image_size=18)
    with pytest.raises(ValueError, match="fewer layers"):
        tiny_config(image_size=16, n_layers=4)
    with pytest.raises(ValueError, match="unknown profile"):
        cyclegan_config("huge")
    paper = cyclegan_config("paper")
    assert (paper.ngf, paper.n_blocks, paper.n_layers, paper.lambda_id) == (64, 9, 3, 0.5 * paper.lambda_cyc)


# --------------------------------------------------------------------------- losses and pool

def test_lsgan_loss_is_the_mean_squared_distance_to_the_target_label():
    pred = torch.tensor([[0.0, 0.5], [1.0, 2.0]])
    assert lsgan_loss(pred, True).item() == pytest.approx((1 + 0.25 + 0 + 1) / 4)
    assert lsgan_loss(pred, False).item() == pytest.approx((0 + 0.25 + 1 + 4) / 4)


def test_lr_is_constant_then_decays_linearly_over_the_second_half():
    factors = [cg.lr_factor(s, 10) for s in range(10)]
    assert factors[:4] == [1.0] * 4
    assert np.allclose(np.diff(factors[4:]), -1 / 6)
    assert factors[-1] == pytest.approx(1 / 6)


def test_image_pool_fills_then_swaps_half_of_the_time():
    pool = ImagePool(size=4)
    g = torch.Generator().manual_seed(0)
    first = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert torch.equal(pool.query(first, g), first)  # while filling: the inputs themselves
    assert len(pool.images) == 4
    from_pool, n = 0, 2000
    for k in range(n):
        new = torch.full((1, 1, 1, 1), 100.0 + k)
        out = pool.query(new, g)
        from_pool += int(out.item() != new.item())
        assert len(pool.images) == 4
    assert 0.45 < from_pool / n < 0.55
    assert ImagePool(size=0).query(first, g) is first


def test_image_pool_is_deterministic_per_generator():
    images = torch.randn(30, 1, 2, 2)
    outs = []
    for _ in range(2):
        pool, g = ImagePool(size=5), torch.Generator().manual_seed(3)
        outs.append(torch.cat([pool.query(images[i: i + 3], g) for i in range(0, 30, 3)]))
    assert torch.equal(*outs)


# --------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def domains():
    return domain(64, False, 0), domain(64, True, 1), domain(32, False, 2)


@pytest.fixture(scope="module")
def trained(domains):
    a, b, _ = domains
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_cyclegan(a, b, tiny_config(), seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_translation_takes_the_style_of_b_and_the_cycle_returns_to_a(domains, trained):
    a, b, held_out = domains
    untrained = CycleGAN(tiny_config(), seed=0).eval()
    with torch.no_grad():
        fake_b = trained.g_ab(held_out)
        cycled = trained.g_ba(fake_b)
        untrained_cycle = untrained.g_ba(untrained.g_ab(held_out))
    mean_a, mean_b = held_out.mean().item(), b.mean().item()
    assert abs(fake_b.mean().item() - mean_b) < 0.25 * abs(mean_a - mean_b)
    assert stripe_energy(fake_b) > 0.6 * stripe_energy(b) > 10 * stripe_energy(held_out)
    bound = 0.15
    assert (cycled - held_out).abs().mean().item() < bound
    assert (untrained_cycle - held_out).abs().mean().item() > bound


def test_training_is_deterministic_per_seed(domains):
    a, b, _ = domains
    config = tiny_config(steps=4)
    again = [train_cyclegan(a, b, config, seed=0, progress=False) for _ in range(2)]
    assert state_equal(*again)
    assert not state_equal(again[0], train_cyclegan(a, b, config, seed=1, progress=False))


def test_resuming_after_a_kill_reaches_bit_identical_weights(domains, tmp_path, monkeypatch):
    a, b, _ = domains
    config = tiny_config(steps=9, checkpoint_every=3)
    uninterrupted = train_cyclegan(a, b, config, seed=5, progress=False)

    real_save, saves = cg._save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(args[1])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after the step-6 checkpoint, as by a signal
    monkeypatch.setattr(cg, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_cyclegan(a, b, config, seed=5, out=tmp_path, progress=False)
    monkeypatch.setattr(cg, "_save_checkpoint", real_save)
    assert saves == [3, 6]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary behind

    resumed = train_cyclegan(a, b, config, seed=5, out=tmp_path, progress=False)
    assert state_equal(resumed, uninterrupted)
    with pytest.raises(ValueError, match="another seed"):
        train_cyclegan(a, b, config, seed=6, out=tmp_path, progress=False)


def test_training_refuses_images_of_another_size(domains):
    a, b, _ = domains
    with pytest.raises(ValueError, match=r"images_b must be a non-empty \(N, 1, 32, 32\)"):
        train_cyclegan(torch.zeros(4, 1, 32, 32), b, tiny_config(image_size=32), progress=False)


# --------------------------------------------------------------------------- device translators

@pytest.fixture(scope="module")
def phantom(tiny_phantom) -> pd.DataFrame:
    return read_manifest(tiny_phantom)


def two_targets(df: pd.DataFrame) -> list[str]:
    counts = df[df["split"] == "train"]["device"].value_counts()
    return sorted(counts.index[:2])


@pytest.fixture(scope="module")
def translators(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("translators")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitted = DeviceTranslators().fit(phantom, two_targets(phantom), profile="smoke", seed=0, out_dir=out,
                                         config_overrides={"steps": 2}, progress=False)
    finally:
        torch.set_num_threads(threads)
    return fitted, out


def test_fit_trains_one_translator_per_target_device_from_all_other_devices(phantom, translators):
    fitted, out = translators
    targets = two_targets(phantom)
    train_devices = set(phantom[phantom["split"] == "train"]["device"])
    assert fitted.devices == targets
    assert fitted.image_size == 32
    for target in targets:
        translator = fitted.translators[target]
        assert set(translator.source_devices) == train_devices - {target}
        meta = json.loads((out / f"{device_slug(target)}.json").read_text())
        assert (meta["device"], meta["image_size"]) == (target, 32)
    assert not (out / "training" / device_slug(targets[0])).exists()


def test_fit_skips_finished_translators_on_rerun(phantom, translators, monkeypatch):
    fitted, out = translators

    def no_training(*args, **kwargs):
        raise AssertionError("a finished translator was trained again")
    monkeypatch.setattr("busgen_lib.devices.translate.train_cyclegan", no_training)
    again = DeviceTranslators().fit(phantom, fitted.devices, profile="smoke", seed=0, out_dir=out,
                                    config_overrides={"steps": 2}, progress=False)
    for device in fitted.devices:
        assert state_equal(again.translators[device].generator, fitted.translators[device].generator)
    with pytest.raises(ValueError, match="another config"):
        DeviceTranslators().fit(phantom, fitted.devices, profile="smoke", seed=0, out_dir=out,
                                config_overrides={"steps": 3}, progress=False)


def test_save_load_round_trip_and_clear_errors(translators, tmp_path):
    fitted, _ = translators
    fitted.save(tmp_path)
    loaded = DeviceTranslators.load(tmp_path, image_size=32, devices=fitted.devices[:1])
    assert loaded.devices == fitted.devices
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    for device in fitted.devices:
        assert torch.equal(loaded.translate(x, device), fitted.translate(x, device))
    with pytest.raises(ValueError, match="trained at 32 px, not 64 px"):
        DeviceTranslators.load(tmp_path, image_size=64)
    with pytest.raises(ValueError, match="no translator for device"):
        DeviceTranslators.load(tmp_path, devices=["Vendor-Z X1"])
    with pytest.raises(FileNotFoundError, match="no device translators"):
        DeviceTranslators.load(tmp_path / "empty")


def test_augment_devices_gives_every_device_with_the_source_as_itself(phantom, translators):
    fitted, _ = translators
    source = next(d for d in sorted(fitted.known_devices) if d not in fitted.devices)
    image = torch.rand(1, 32, 32) * 2 - 1
    variants = fitted.augment_devices(image, source)
    assert set(variants) == {*fitted.devices, source}
    assert variants[source] is image
    assert all(v.shape == image.shape for v in variants.values())
    assert not torch.equal(variants[fitted.devices[0]], image)
    target = fitted.devices[0]
    as_target = fitted.augment_devices(image, target)
    assert as_target[target] is image and set(as_target) == set(fitted.devices)
    batch = fitted.augment_devices(torch.zeros(3, 1, 32, 32), source)
    assert all(v.shape == (3, 1, 32, 32) for v in batch.values())


def test_unknown_device_or_size_is_a_clear_error(translators):
    fitted, _ = translators
    with pytest.raises(ValueError, match="unknown device 'Vendor-Z X1'"):
        fitted.augment_devices(torch.zeros(1, 32, 32), "Vendor-Z X1")
    with pytest.raises(ValueError, match="no translator for device 'Vendor-Z X1'"):
        fitted.translate(torch.zeros(1, 32, 32), "Vendor-Z X1")
    with pytest.raises(ValueError, match=r"\(1, 32, 32\) image"):
        fitted.augment_devices(torch.zeros(1, 64, 64), fitted.devices[0])


def test_augment_manifest_writes_copies_that_keep_every_label(phantom, translators, tmp_path):
    fitted, _ = translators
    rows = phantom[phantom["split"] == "train"].head(5)
    rows.attrs = dict(phantom.attrs)
    copies = augment_manifest(rows, fitted, tmp_path, progress=False)
    expected = sum(len([d for d in fitted.devices if d != s]) for s in rows["device"])
    assert len(copies) == expected
    kept = [c for c in rows.columns if c not in ("image", "device")]
    by_path = {str((Path(phantom.attrs["root"]) / r["image"]).resolve()): r for _, r in rows.iterrows()}
    for _, copy in copies.iterrows():
        source = by_path[copy["source_image"]]
        assert copy["device"] != copy["source_device"] == source["device"]
        assert copy[kept].tolist() == source[kept].tolist()
        with Image.open(copy["image"]) as im, Image.open(copy["source_image"]) as original:
            assert im.size == original.size
    written = read_manifest(tmp_path / "manifest.csv")  # a valid manifest: masks still fit their images
    assert len(written) == expected
    assert load_images(written, 32).shape == (expected, 1, 32, 32)


def test_phantom_renderer_reproduces_the_stored_view_and_changes_only_the_device(phantom):
    render = phantom_renderer(seed=7, n_images=60, size=32)
    for i in (0, 17, 59):
        row = phantom.iloc[i]
        with Image.open(f"{phantom.attrs['root']}/{row['image']}") as im:
            stored = np.asarray(im)
        assert np.array_equal(render(row, row["device"]), stored)
    other = next(d for d in sorted(set(phantom["device"])) if d != phantom["device"].iloc[0])
    assert not np.array_equal(render(phantom.iloc[0], other), render(phantom.iloc[0], phantom["device"].iloc[0]))
