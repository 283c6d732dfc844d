"""Model folders and training checkpoints, written by the field's libraries, atomically.

A *model folder* is diffusers' `save_pretrained` of `BUSGenUNet` (`config.json`,
`diffusion_pytorch_model.safetensors`) plus text files that travel with the
model (`box_prior.json`); sampling and adaptation load it with `load_model`. A
*training checkpoint* (`checkpoints/step-<8-digit step>/`) is accelerate's
`save_state`: model, optimizer, the objects registered for checkpointing (LR
schedule, step counter, EMA) and every process's RNG states, so that
`pretrain --resume` continues exactly.

What is ours: every folder is written into a temporary sibling and moved into
place with `os.replace`, so a kill never leaves half a folder behind (neither
library does this), and a model folder that is missing, damaged or from another
profile is refused with a message that says which and what to do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from diffusers import ConfigMixin, ModelMixin
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from busgen_lib.diffusion.coldit import CoLDiT
from busgen_lib.diffusion.model import BUSGenUNet
from busgen_lib.errors import DataError

CONFIG_FILE, WEIGHTS_FILE = CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME  # diffusers' names in a model folder
CHECKPOINTS = "checkpoints"


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes (weights files): records *which* model or adapter made a sample folder."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends without error, it becomes `final`.

    The new folder moves in with one `os.replace`; an existing `final` is first
    moved aside (a folder cannot be renamed onto a non-empty one), so at any
    instant `final` is the whole old folder, the whole new one, or (between the
    two renames) absent with the old one kept as `.<name>.old`. A failure inside
    the block removes the temporary folder and leaves `final` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- model folders

def save_model(model: ModelMixin, out: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write a model folder atomically; `extra_files` maps file names to text (e.g. the box prior)."""
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


MODEL_FOLDER = "a busgen model folder (the model/ folder of a pretrain run)"


def read_config(folder: str | Path, cls: type[ConfigMixin] = BUSGenUNet, what: str = MODEL_FOLDER) -> dict[str, Any]:
    """The arguments a saved model was built with (`cls.load_config`), or a DataError when `folder` is not one."""
    if not (Path(folder) / CONFIG_FILE).is_file():
        raise DataError(f"{folder}: no {CONFIG_FILE}; is this {what}?")
    try:
        return cls.load_config(folder)
    except (OSError, ValueError) as err:  # diffusers raises EnvironmentError for unreadable JSON
        raise DataError(f"{Path(folder) / CONFIG_FILE}: {err}; is this {what}?") from None


def load_pretrained(cls: type[ModelMixin], folder: str | Path, what: str, advice: str) -> ModelMixin:
    """`cls.from_pretrained(folder)`, strict: a missing, damaged or ill-fitting weights file is a DataError.

    diffusers only warns about weights missing from the file (and initialises
    them at random); here every weight must come from the file.
    """
    folder = Path(folder)
    read_config(folder, cls, what)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights}: weights file not found; the folder is incomplete ({advice})")
    try:
        # low_cpu_mem_usage=False: build the network normally, then copy every stored weight into it.
        model, info = cls.from_pretrained(folder, low_cpu_mem_usage=False, device_map=None, output_loading_info=True)
    except (ValueError, TypeError) as err:  # a configuration whose arguments the network refuses
        raise DataError(f"{folder / CONFIG_FILE}: {err}; is this {what}?") from None
    except Exception as err:  # safetensors' own SafetensorError, OSError, RuntimeError (shapes) on damaged files
        raise DataError(f"{weights}: cannot read the weights ({' '.join(str(err).split())[:300]}); the file is "
                        f"damaged, not safetensors or not this architecture: {advice}") from None
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing or unexpected:
        raise DataError(f"{weights} does not fit the architecture in {CONFIG_FILE}: {len(missing)} weights missing "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); {advice}")
    return model


BACKBONE_CLASSES: dict[str, type[ModelMixin]] = {"unet": BUSGenUNet, "dit": CoLDiT}  # --backbone → network


def backbone_of(folder: str | Path) -> str:
    """The backbone a model folder records: diffusers writes the network's class name into its config.json."""
    name = read_config(folder).get("_class_name")
    for backbone, cls in BACKBONE_CLASSES.items():
        if cls.__name__ == name:
            return backbone
    raise DataError(f"{Path(folder) / CONFIG_FILE}: a {name!r} model, not one of busgen's backbones "
                    f"({', '.join(f'{c.__name__} ({b})' for b, c in BACKBONE_CLASSES.items())}); is this {MODEL_FOLDER}?")


def load_generator(folder: str | Path, profile: str | None = None, backbone: str | None = None,
                   map_location: str = "cpu") -> ModelMixin:
    """The model in `folder`, of the backbone it records, or (with `backbone`) only of that one.

    Refuses, naming the difference, a folder of another backbone than asked for,
    one written for another profile than `profile` (when given), a missing or
    damaged weights file, or weights that do not fit the stored architecture.
    """
    found = backbone_of(folder)
    if backbone is not None and found != backbone:
        raise DataError(f"{folder}: holds a {BACKBONE_CLASSES[found].__name__} model (backbone {found}), but this "
                        f"needs a {BACKBONE_CLASSES[backbone].__name__} (backbone {backbone}); pass a model folder of "
                        f"`pretrain --backbone {backbone}`")
    config = read_config(folder)
    if profile is not None and config.get("profile") != profile:
        raise DataError(f"{folder}: model was trained under profile {config.get('profile')!r} "
                        f"({config.get('image_size')} px), not {profile!r}")
    return load_pretrained(BACKBONE_CLASSES[found], folder, MODEL_FOLDER, "copy it again or retrain").to(map_location)


def load_model(folder: str | Path, profile: str | None = None, map_location: str = "cpu") -> BUSGenUNet:
    """The BUSGen UNet of a model folder (`load_generator` with backbone unet): LoRA, CPSample and cleaning need it."""
    return load_generator(folder, profile, "unet", map_location)


def load_coldit(folder: str | Path, profile: str | None = None, map_location: str = "cpu") -> CoLDiT:
    """The CoLDiT of a model folder (`load_generator` with backbone dit)."""
    return load_generator(folder, profile, "dit", map_location)


# --------------------------------------------------------------------------- training checkpoints

def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """`accelerator.save_state` into `checkpoints/step-<step>/` atomically; keeps the last `keep` checkpoints.

    Call on every process (each writes its RNG state); the main process moves the folder into place.
    """
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)  # a new name: one rename, nothing to move aside
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (step folders appear whole or not at all), or None for a fresh run."""
    steps = sorted((Path(run_dir) / CHECKPOINTS).glob("step-*"))
    return steps[-1] if steps else None


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> None:
    """`accelerator.load_state(path)`, with a DataError naming a checkpoint it cannot read (damaged, or written
    by busgen before checkpoints were accelerate's)."""
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise DataError(f"{path}: cannot resume from this checkpoint ({str(err).splitlines()[0]}); it is damaged or "
                        "from an older busgen: delete it to resume from the one before, or start a new --out") from None
