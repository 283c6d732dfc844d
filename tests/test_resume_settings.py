"""Issue 14: a rerun into a run or sample folder with other settings is refused with the difference named
(a sample folder used to mix two generators; `pretrain --resume --batch-size 4` continued a batch-8 run)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from busgen_lib.diffusion.checkpoint import WEIGHTS_FILE, file_fingerprint
from busgen_lib.diffusion.pipeline import sample_dataset
from busgen_lib.diffusion.speed import Speed
from busgen_lib.diffusion.train import pretrain
from busgen_lib.errors import UsageError


def test_the_sample_folder_records_what_determines_an_image(tmp_path, smoke_model, one_thread):
    sample_dataset(smoke_model, 2, tmp_path / "o", steps=1, guidance=0.5, seed=3)
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings == {"model": file_fingerprint(smoke_model / WEIGHTS_FILE), "adapter": None,
                        "sampler": "dpmsolver++-singlestep", "steps": 1, "order": 3, "guidance": 0.5, "seed": 3,
                        "cond_fn": None, "precision": "fp32", "image_ext": "png"}


@pytest.mark.parametrize("change, named", [
    ({"steps": 2}, "steps (stored 1, given 2)"),
    ({"guidance": 1.0}, "guidance (stored 0.5, given 1.0)"),
    ({"sampler": "ddpm"}, "sampler (stored 'dpmsolver++-singlestep', given 'ddpm')"),
    ({"speed": Speed(precision="bf16")}, "precision (stored 'fp32', given 'bf16')"),
])
def test_a_rerun_with_other_sampling_settings_is_refused(tmp_path, smoke_model, one_thread, change, named):
    settings = {"steps": 1, "guidance": 0.5}
    sample_dataset(smoke_model, 2, tmp_path / "o", **settings)
    with pytest.raises(UsageError, match="was sampled with other settings") as err:
        sample_dataset(smoke_model, 2, tmp_path / "o", **{**settings, **change})
    assert named in str(err.value)


def test_channels_last_resumes_an_fp32_folder(tmp_path, smoke_model, one_thread):
    """Channels-last changes images at fp32 rounding only, like the batch size (test_speed.py): not a new generator."""
    sample_dataset(smoke_model, 2, tmp_path / "o", steps=1, batch_size=1)
    shutil.rmtree(tmp_path / "o" / "shards")  # as if killed before listing anything
    (tmp_path / "o" / "shards").mkdir()
    manifest = sample_dataset(smoke_model, 2, tmp_path / "o", steps=1, batch_size=1, speed=Speed(channels_last=True))
    assert manifest.exists()


def test_a_rerun_with_another_model_is_refused(tmp_path, smoke_model, one_thread):
    sample_dataset(smoke_model, 2, tmp_path / "o", steps=1)
    other = tmp_path / "other"
    shutil.copytree(smoke_model, other)
    weights = load_file(other / WEIGHTS_FILE)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, other / WEIGHTS_FILE)
    with pytest.raises(UsageError, match=r"model \(stored '[0-9a-f]{64}', given '[0-9a-f]{64}'\)"):
        sample_dataset(other, 2, tmp_path / "o", steps=1)


@pytest.mark.parametrize("option, value, words", [
    ("guidance", float("nan"), "--guidance must be a finite number >= 0"),
    ("guidance", float("inf"), "--guidance must be a finite number >= 0"),
    ("guidance", -1.0, "--guidance must be a finite number >= 0"),
    ("steps", 0, "--steps must be a whole number >= 1, got 0"),
    ("batch_size", 0, "--batch-size must be a whole number >= 1, got 0"),
])
def test_sampling_settings_that_write_black_images_are_refused_before_sampling(tmp_path, smoke_model, option,
                                                                              value, words):
    with pytest.raises(UsageError, match=words):
        sample_dataset(smoke_model, 2, tmp_path / "o", **{option: value})
    assert not (tmp_path / "o").exists()


def test_sample_without_images_is_refused(tmp_path, smoke_model):
    with pytest.raises(UsageError, match="needs --n >= 1"):
        sample_dataset(smoke_model, 0, tmp_path / "o")


def test_pretrain_resume_with_another_batch_size_is_refused(tiny_phantom, smoke_model):
    run = smoke_model.parent  # started with steps=2, batch_size=4 (conftest)
    before = (run / "run.json").read_text()
    with pytest.raises(UsageError, match=r"--resume with other settings.*batch_size \(run 4, given 2\)"):
        pretrain(tiny_phantom, "smoke", run, resume=True, train_overrides={"steps": 2, "batch_size": 2},
                 progress=False)
    with pytest.raises(UsageError, match=r"steps \(run 2, given 3\)"):
        pretrain(tiny_phantom, "smoke", run, resume=True, train_overrides={"steps": 3, "batch_size": 4},
                 progress=False)
    assert (run / "run.json").read_text() == before


def test_pretrain_refuses_zero_steps():
    with pytest.raises(UsageError, match="--steps must be a whole number >= 1, got 0"):
        pretrain("unused.csv", "smoke", "unused", train_overrides={"steps": 0})
