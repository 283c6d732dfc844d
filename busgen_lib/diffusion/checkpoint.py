"""Model folders and training checkpoints: safetensors for tensors, JSON for the rest.

A *model folder* (`config.json`, `model.safetensors`, optional `box_prior.json`)
is what sampling and adaptation load. A *training checkpoint* adds the
optimizer, LR schedule, EMA and step, so that `pretrain --resume` continues
exactly. Both are written to a temporary folder and moved into place with one
`os.replace`, so a kill never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from busgen_lib.diffusion.model import BUSGenConfig, BUSGenUNet
from busgen_lib.errors import DataError, UsageError

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
OPTIMIZER_FILE, EMA_FILE, STATE_FILE = "optimizer.safetensors", "ema.safetensors", "trainer_state.json"
LATEST = "latest"


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temporary folder into place (the last step of every atomic folder write)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes (weights files): records *which* model or adapter made a sample folder."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as contiguous CPU tensors, as safetensors wants them."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- model folders

def write_weights_folder(module: nn.Module, config_json: str, out: str | Path,
                         extra_files: dict[str, str] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ text `extra_files`) into `out` atomically: a reader sees the
    old folder or the whole new one, never half of it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / CONFIG_FILE).write_text(config_json)
    save_file(cpu_state(module), tmp / WEIGHTS_FILE)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    replace_dir(tmp, out)
    return out


def save_model(model: BUSGenUNet, out: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write a model folder atomically; `extra_files` maps file names to text (e.g. the box prior)."""
    return write_weights_folder(model, model.config.to_json(), out, extra_files)


def read_config(folder: str | Path) -> BUSGenConfig:
    """The configuration of a model folder or checkpoint, with a clear error when it is not one."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise DataError(f"{folder}: no {CONFIG_FILE}; is this a busgen model folder (the model/ folder of a "
                        "pretrain run)?")
    try:
        return BUSGenConfig.from_json(path.read_text())
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {err}; is this a busgen model folder?") from None


def read_weights(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a DataError naming the file when it is missing or not safetensors."""
    if not path.is_file():
        raise DataError(f"{path}: weights file not found; the folder is incomplete (copy it again or retrain)")
    try:
        return load_file(path, device=map_location)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        raise DataError(f"{path}: cannot read the weights ({err}); the file is damaged or not safetensors, "
                        "copy it again or retrain") from None


def load_model(folder: str | Path, profile: str | None = None, map_location: str = "cpu") -> BUSGenUNet:
    """Rebuild the network from a model folder (or checkpoint) and load its weights.

    Refuses, naming the difference, a folder written for another profile than
    `profile` (when given) or whose weights do not fit the stored architecture.
    """
    folder = Path(folder)
    config = read_config(folder)
    if profile is not None and config.profile != profile:
        raise DataError(f"{folder}: model was trained under profile {config.profile!r} "
                        f"({config.image_size} px), not {profile!r}")
    model = BUSGenUNet(config)
    state = read_weights(folder / WEIGHTS_FILE, map_location)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise DataError(f"{folder / WEIGHTS_FILE} does not fit the architecture in {CONFIG_FILE}: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}), {len(wrong)} of another shape (e.g. {wrong[:2]})")
    model.load_state_dict(state)
    return model


# --------------------------------------------------------------------------- training checkpoints

def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, model: BUSGenUNet, optimizer: torch.optim.Optimizer,
                    lr_scheduler: Any, ema: Any | None = None, keep: int = 2) -> Path:
    """Write `checkpoints/step-<8-digit step>/` atomically, point `checkpoints/latest` at it, keep the last `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / CONFIG_FILE).write_text(model.config.to_json())
    save_file(cpu_state(model), tmp / WEIGHTS_FILE)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / OPTIMIZER_FILE)
    state = {"step": step, "optimizer": opt_meta, "lr_scheduler": _jsonable(lr_scheduler.state_dict())}
    if ema is not None:
        ema_state = ema.state_dict()
        save_file({str(i): p.detach().to("cpu").contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))},
                  tmp / EMA_FILE)
        state["ema"] = _jsonable(ema_state)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    replace_dir(tmp, final)
    _write_text_atomic(root / LATEST, final.name)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points at, or None for a fresh run."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def load_checkpoint(path: str | Path, model: BUSGenUNet, optimizer: torch.optim.Optimizer,
                    lr_scheduler: Any, ema: Any | None = None) -> int:
    """Restore everything `save_checkpoint` wrote into live objects; returns the step to continue from."""
    path = Path(path)
    stored = read_config(path)
    if stored != model.config:
        diff = {k: (v, getattr(model.config, k)) for k, v in stored.to_dict().items()
                if model.config.to_dict().get(k) != v}
        raise UsageError(f"{path}: checkpoint was written for another model configuration; "
                         f"differences (checkpoint, requested): {diff}; resume with the options the run was "
                         "started with (--profile, --box-mode) or choose another --out")
    model.load_state_dict(load_file(path / WEIGHTS_FILE))
    state = json.loads((path / STATE_FILE).read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / OPTIMIZER_FILE), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"{path}: run resumed with EMA but the checkpoint has none")
        shadow = load_file(path / EMA_FILE)
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    return int(state["step"])


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """LR-schedule and EMA states are numbers and lists (LambdaLR stores its plain functions as None)."""
    return {k: (v.item() if torch.is_tensor(v) else v) for k, v in state.items()
            if not callable(v)}
