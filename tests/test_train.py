"""Pretraining: exact resume, refusal of mismatched runs, and data-parallel replicas in sync."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from busgen_lib.diffusion import train as train_module
from busgen_lib.diffusion.checkpoint import latest_checkpoint, load_model
from busgen_lib.diffusion.train import pretrain, weights_digest
from busgen_lib.errors import UsageError

STEPS = dict(steps=6, batch_size=4, checkpoint_every=3, warmup_steps=1, log_every=1)


def _digest(model_dir: Path) -> str:
    return weights_digest(load_model(model_dir))


def test_resume_after_a_kill_reaches_the_same_weights(tiny_phantom, tmp_path, monkeypatch):
    reference = _digest(pretrain(tiny_phantom, "smoke", tmp_path / "straight", train_overrides=STEPS, progress=False))

    calls = {"n": 0}
    real_loss = train_module.diffusion_loss

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-3 checkpoint, before step 5 completes
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "diffusion_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_phantom, "smoke", tmp_path / "killed", train_overrides=STEPS, progress=False)
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000003"
    monkeypatch.setattr(train_module, "diffusion_loss", real_loss)

    resumed = pretrain(tiny_phantom, "smoke", tmp_path / "killed", resume=True, train_overrides=STEPS, progress=False)
    assert _digest(resumed) == reference
    steps_logged = [int(line.split(",")[0]) for line in (tmp_path / "killed" / "loss.csv").read_text().splitlines()[1:]]
    assert steps_logged == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing logged twice

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_module, "fit", must_not_train)
    written = (resumed / "config.json").stat().st_mtime_ns
    again = pretrain(tiny_phantom, "smoke", tmp_path / "killed", resume=True, train_overrides=STEPS, progress=False)
    assert again == resumed and (again / "config.json").stat().st_mtime_ns == written and _digest(again) == reference


def test_a_different_seed_gives_different_weights(tiny_phantom, tmp_path):
    a = pretrain(tiny_phantom, "smoke", tmp_path / "a", train_overrides={**STEPS, "steps": 2}, progress=False)
    b = pretrain(tiny_phantom, "smoke", tmp_path / "b", train_overrides={**STEPS, "steps": 2, "seed": 1}, progress=False)
    assert _digest(a) != _digest(b)


def test_existing_run_is_not_overwritten_and_foreign_checkpoint_is_refused(tiny_phantom, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_phantom, "smoke", run, train_overrides={**STEPS, "steps": 3}, progress=False)
    with pytest.raises(UsageError, match="--resume"):
        pretrain(tiny_phantom, "smoke", run, train_overrides=STEPS, progress=False)
    with pytest.raises(ValueError, match="box_mode"):
        pretrain(tiny_phantom, "smoke", run, resume=True, train_overrides=STEPS,
                 model_overrides={"box_mode": "embedding"}, progress=False)
    with pytest.raises(ValueError, match="profile 'smoke'"):
        load_model(run / "model", profile="demo")


def test_ema_weights_are_exported_and_resume_with_ema(tiny_phantom, tmp_path):
    cfg = {**STEPS, "ema_decay": 0.9}
    model_dir = pretrain(tiny_phantom, "smoke", tmp_path / "ema", train_overrides=cfg, progress=False)
    ckpt = latest_checkpoint(tmp_path / "ema")
    ema = torch.load(ckpt / "custom_checkpoint_2.pkl", weights_only=True)  # registered third, after LR and step
    raw = load_file(ckpt / "model.safetensors")  # accelerate's copy of the live (raw) weights
    exported = load_model(model_dir)
    trainable = [name for name, _ in exported.named_parameters()]
    # The exported model is the EMA average stored in the checkpoint, not the last raw weights.
    assert all(torch.equal(exported.state_dict()[n], p) for n, p in zip(trainable, ema["shadow_params"]))
    assert not all(torch.equal(exported.state_dict()[n], raw[n]) for n in trainable)


@pytest.mark.slow
def test_two_process_data_parallel_run_ends_with_identical_replicas(tiny_phantom, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` selects accelerate's torchrun launcher; with no GPU the trainer asks for CPU processes
    # (gloo). Plain `--cpu --num_processes 2` would need mpirun.
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "busgen_lib", "pretrain", "--manifest", str(tiny_phantom), "--profile", "smoke",
           "--out", str(out), "--steps", "3", "--batch-size", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(out / f"replica-{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    assert digests[0] == _digest(out / "model")
