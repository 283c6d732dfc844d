"""Model folders and training checkpoints are written whole or not at all (atomic writes)."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from busgen_lib.diffusion.checkpoint import WEIGHTS_FILE, latest_checkpoint, load_checkpoint, load_model, save_model
from busgen_lib.diffusion.model import BUSGenUNet, build_model
from busgen_lib.diffusion.train import pretrain, weights_digest
from busgen_lib.errors import DataError

DEVICES = ("dev-a", "dev-b")


def _model(seed: int) -> BUSGenUNet:
    torch.manual_seed(seed)
    return build_model("smoke", DEVICES, block_out_channels=(8, 16), norm_num_groups=4)


def test_a_model_write_that_fails_midway_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    folder = save_model(_model(0), tmp_path / "model", extra_files={"box_prior.json": '{"old": 1}'})
    old_digest = weights_digest(load_model(folder))
    real_save = BUSGenUNet.save_pretrained

    def dies_midway(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        (Path(directory) / WEIGHTS_FILE).write_bytes(b"half a file")  # then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(BUSGenUNet, "save_pretrained", dies_midway)
    with pytest.raises(OSError, match="No space"):
        save_model(_model(1), folder, extra_files={"box_prior.json": '{"new": 1}'})
    assert weights_digest(load_model(folder)) == old_digest
    assert (folder / "box_prior.json").read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind

    monkeypatch.setattr(BUSGenUNet, "save_pretrained", real_save)
    (tmp_path / ".model.tmp").mkdir()  # what a killed writer leaves: ignored by readers, cleared by the next write
    (tmp_path / ".model.tmp" / WEIGHTS_FILE).write_bytes(b"stale")
    new = _model(1)
    save_model(new, folder, extra_files={"box_prior.json": '{"new": 1}'})
    assert weights_digest(load_model(folder)) == weights_digest(new) != old_digest
    assert (folder / "box_prior.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_checkpoint_write_that_fails_midway_is_never_resumed_from(tiny_phantom, tmp_path, monkeypatch):
    steps = dict(steps=2, batch_size=4, checkpoint_every=1, warmup_steps=1, log_every=1)
    reference = weights_digest(load_model(pretrain(tiny_phantom, "smoke", tmp_path / "straight",
                                                   train_overrides=steps, progress=False)))
    real_save, calls = Accelerator.save_state, {"n": 0}

    def dies_in_the_second_save(self, output_dir=None, **kwargs):
        calls["n"] += 1
        real_save(self, output_dir, **kwargs)
        if calls["n"] == 2:  # the step-2 checkpoint is written, but the process dies before it is moved in
            raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", dies_in_the_second_save)
    run = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_phantom, "smoke", run, train_overrides=steps, progress=False)
    assert latest_checkpoint(run).name == "step-00000001"
    assert (run / "checkpoints" / ".step-00000002.tmp").is_dir()  # the unfinished one, invisible to readers
    monkeypatch.setattr(Accelerator, "save_state", real_save)

    resumed = pretrain(tiny_phantom, "smoke", run, resume=True, train_overrides=steps, progress=False)
    assert weights_digest(load_model(resumed)) == reference
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_a_checkpoint_accelerate_cannot_read_is_named(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = _model(0)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    old = tmp_path / "checkpoints" / "step-00000003"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text('{"step": 3}')  # a checkpoint of the format before accelerate's
    with pytest.raises(DataError, match=f"{old}: cannot resume from this checkpoint .*start a new --out"):
        load_checkpoint(accelerator, old)


def test_a_weights_file_missing_a_weight_is_refused_not_filled_at_random(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_model(_model(0), tmp_path / "model")
    weights = load_file(folder / WEIGHTS_FILE)
    del weights["conditions.device_embedding.weight"]
    save_file(weights, folder / WEIGHTS_FILE)
    with pytest.raises(DataError, match=r"does not fit the architecture in config.json: 1 weights missing "
                                        r"\(e.g. \['conditions.device_embedding.weight'\]\)"):
        load_model(folder)
