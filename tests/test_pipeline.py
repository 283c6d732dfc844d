"""The `sample` path: model folder → plan → guided sampler → labelled, valid synthetic manifest."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from busgen_lib.data.manifest import read_manifest, resolve
from busgen_lib.diffusion.checkpoint import load_model
from busgen_lib.diffusion.pipeline import requests_to_cond, sample_dataset
from busgen_lib.diffusion.plan import Request


def _pixels(df, i):
    return np.asarray(Image.open(resolve(df, "image", i)), dtype=int)


def test_balanced_generation_writes_a_valid_manifest_labelled_with_the_requests(smoke_model, tmp_path):
    manifest = sample_dataset(smoke_model, 6, tmp_path / "gen", steps=3, batch_size=3)
    df = read_manifest(manifest)
    size = load_model(smoke_model).config.image_size
    assert len(df) == 6 and df["index"].astype(int).tolist() == list(range(6))
    assert set(df["pathology"]) == {"normal", "benign", "malignant"}
    assert (df.loc[df["pathology"] == "normal", "boxes"] == "[]").all()
    assert (df.loc[df["pathology"] != "normal", "boxes"] != "[]").all()
    assert all(_pixels(df, i).shape == (size, size) for i in range(len(df)))


def test_a_sample_does_not_depend_on_its_batch(smoke_model, tmp_path):
    one = read_manifest(sample_dataset(smoke_model, 4, tmp_path / "b1", steps=3, batch_size=1))
    four = read_manifest(sample_dataset(smoke_model, 4, tmp_path / "b4", steps=3, batch_size=4))
    for i in range(4):  # batched convolutions may round differently: allow one grey level
        assert np.abs(_pixels(one, i) - _pixels(four, i)).max() <= 1
    assert np.abs(_pixels(one, 0) - _pixels(one, 1)).max() > 10  # and different seeds differ


def test_explicit_plan_with_unknown_device_fails_before_any_image_is_written(smoke_model, tmp_path):
    plan = tmp_path / "plan.csv"
    pd.DataFrame({"pathology": ["benign", "malignant"], "device": ["", "Acme X1"],
                  "boxes": ["[[0.2,0.2,0.5,0.5]]", "[[0.1,0.1,0.4,0.6]]"]}).to_csv(plan, index=False)
    with pytest.raises(ValueError, match="Acme X1"):
        sample_dataset(smoke_model, 0, tmp_path / "gen", plan=plan, steps=2)
    assert not (tmp_path / "gen" / "images").exists() or not any((tmp_path / "gen" / "images").iterdir())


def test_requests_become_the_training_condition_indices(smoke_model):
    model = load_model(smoke_model)
    device = model.config.device_names[1]
    cond = requests_to_cond([Request(0, 1, "malignant", device, [(0.0, 0.0, 0.5, 0.25)]),
                             Request(1, 2, "normal", "", [])], model)
    assert cond["pathology"].tolist() == [3, 1]            # 0 is the null token
    assert cond["device"].tolist() == [2, 0]
    assert cond["box_valid"].tolist()[0][:2] == [True, False]
    size = model.config.image_size
    assert cond["box_mask"][0, 0].sum().item() == (size // 2) * (size // 4)
    assert cond["box_mask"][1].sum().item() == 0


def test_in_memory_samples_are_the_written_files(smoke_model, tmp_path):
    from busgen_lib.diffusion.pipeline import sample_images
    from busgen_lib.diffusion.plan import explicit_plan

    model = load_model(smoke_model)
    written = read_manifest(sample_dataset(smoke_model, 3, tmp_path / "gen", steps=3, batch_size=3))
    plan = explicit_plan(written[["pathology", "device", "boxes", "seed"]], devices=(*model.config.device_names, ""))
    images = sample_images(model, plan, steps=3, guidance=1.8, sampler="dpmsolver++-singlestep", order=3,
                           batch_size=2, progress=False)
    files = np.stack([_pixels(written, i) for i in range(3)])
    assert np.abs((images[:, 0].numpy() + 1) * 127.5 - files).max() <= 1.0 + 1e-4
    half = sample_images(model, plan, size=model.config.image_size // 2, steps=3, guidance=1.8,
                         sampler="dpmsolver++-singlestep", order=3, batch_size=2, progress=False)
    # the same (uint8-quantised) samples, resized like the data layer resizes: antialiased bilinear
    reference = torch.nn.functional.interpolate(images, size=(model.config.image_size // 2,) * 2, mode="bilinear",
                                                antialias=True)
    torch.testing.assert_close(half, reference)
