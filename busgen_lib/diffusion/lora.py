"""Few-shot adaptation of a pretrained BUSGen model with LoRA (§4.3.2), on peft.

The pretrained network stays frozen; peft's `inject_adapter_in_model` wraps the
chosen layers with low-rank adapters (ΔW = B·A·α/r, B initialised to zero, so
an untrained adapter changes nothing). What is ours is the glue:

* which layers: attention projections, residual-block convolutions, and the
  condition/time projections (`TARGETS`), selectable by name;
* adapter folders in peft's own format, apart from the base (`LoraConfig.save_pretrained`'s
  `adapter_config.json` + `get_peft_model_state_dict` in `adapter_model.safetensors`, a
  few percent of the base), whose weights file names the base they were trained
  on by a fingerprint of its weights, so that loading one onto another base is refused;
* several named adapters beside one base, switched with `use_adapter`;
* `merge_adapter`: folds an adapter into a plain `BUSGenUNet` for sampling at
  the base model's speed;
* `adapt`: the training run, through the same loop as pretraining (train.fit).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, load_peft_weights
from safetensors import safe_open
from safetensors.torch import save_file

from busgen_lib.data.manifest import read_manifest
from busgen_lib.diffusion.checkpoint import atomic_folder, load_model
from busgen_lib.diffusion.model import BUSGenUNet
from busgen_lib.diffusion.train import (BOX_PRIOR_FILE, TrainConfig, check_run_settings, check_train_config,
                                        file_digest, finished, fit, fit_box_prior, make_accelerator,
                                        refuse_overwrite, train_dataset)
from busgen_lib.errors import DataError, UsageError
from busgen_lib.profiles import ADAPT, get_profile

ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME  # peft's names
ADAPTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESERVED_NAMES = ("default", "weight", "bias")  # peft's and torch's own attribute names on an adapted layer

# Module-name patterns (regular expressions, full match) of the layers that get adapters.
TARGETS: dict[str, str] = {
    "attention": r".*\.(to_q|to_k|to_v|to_out\.0)",
    "resnet": r".*\.resnets\.\d+\.(conv1|conv2)",
    "conditioning": r"conditions\.proj\.(0|2)|unet\.time_embedding\.linear_(1|2)|.*\.time_emb_proj",
}


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA rank, scaling and targets (keys of TARGETS)."""

    rank: int = 8
    alpha: float | None = None  # LoRA scaling α (ΔW = B·A·α/r); None: α = r
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "resnet", "conditioning")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise UsageError(f"--targets must be a non-empty subset of {', '.join(TARGETS)}, got {list(self.targets)}")
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")

    def lora_config(self) -> LoraConfig:
        pattern = "|".join(f"(?:{TARGETS[t]})" for t in self.targets)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          lora_dropout=self.dropout, target_modules=pattern)




# --------------------------------------------------------------------------- adapters on a live model

def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the base weights alone: the same before and after adapters are injected or trained."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.replace(".base_layer", "").encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", {}))


def check_adapter_name(name: str) -> str:
    """Refuse names peft cannot use as a module key ("" or with "."), or that would shadow its own
    attributes: a letter, then letters, digits or "_"."""
    if not ADAPTER_NAME.fullmatch(name) or name.startswith(("lora_", "base_")) or name in RESERVED_NAMES:
        raise UsageError(f"--adapter {name!r} cannot name an adapter; use a letter followed by letters, digits or _ "
                         f"(e.g. dcis), not starting with lora_ or base_ and not one of {', '.join(RESERVED_NAMES)}")
    return name


def add_adapter(model: BUSGenUNet, name: str, config: AdapterConfig | LoraConfig = AdapterConfig()) -> BUSGenUNet:
    """Inject a new, untrained adapter `name` and make it the active one; base weights are frozen."""
    check_adapter_name(name)
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    lora_config = config.lora_config() if isinstance(config, AdapterConfig) else config
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: here that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(lora_config, model, adapter_name=name)
    use_adapter(model, name)
    return model


def use_adapter(model: BUSGenUNet, name: str | None) -> None:
    """Activate adapter `name` (only its parameters train), or None for the bare base model."""
    layers = _tuner_layers(model)
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    for _, layer in layers:
        layer.enable_adapters(name is not None)
        if name is not None:
            layer.set_adapter(name)  # also marks only this adapter's weights trainable
    for param_name, param in model.named_parameters():
        if "lora_" not in param_name:
            param.requires_grad_(False)


def save_adapter(model: BUSGenUNet, name: str, out: str | Path, base: str = "",
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write adapter `name` as its own folder in peft's format, atomically; `base` notes where its base lives.

    The weights file's metadata carries the adapter's name and the fingerprint of
    the base weights it was trained on (peft has no field for either).
    """
    lora_config = copy.copy(model.peft_config[name])
    lora_config.base_model_name_or_path = str(base)
    state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    with atomic_folder(out) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file(state, tmp / ADAPTER_WEIGHTS_FILE,
                  metadata={"format": "pt", "adapter_name": name, "base_fingerprint": base_fingerprint(model)})
        for file, text in (extra_files or {}).items():
            (tmp / file).write_text(text)
    return Path(out)


def read_adapter_meta(folder: str | Path) -> dict[str, Any]:
    """An adapter folder's LoRA configuration, name, base path and base fingerprint, or a DataError saying what
    is wrong with the folder."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_FILE).is_file():
        raise DataError(f"{folder}: no {ADAPTER_CONFIG_FILE}; is this a busgen adapter folder (the adapter/ folder "
                        "of an adapt run)?")
    try:
        lora_config = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, OSError) as err:
        raise DataError(f"{folder / ADAPTER_CONFIG_FILE}: not a readable LoRA configuration ({err}); "
                        "copy the adapter folder again") from None
    weights = folder / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights}: weights file not found; the adapter folder is incomplete (copy it again)")
    try:
        with safe_open(weights, "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors' own SafetensorError on damaged files
        raise DataError(f"{weights}: cannot read the weights ({err}); copy the adapter folder again") from None
    if "base_fingerprint" not in meta:
        raise DataError(f"{weights}: no base-model fingerprint in its metadata; not an adapter written by busgen "
                        "(save_adapter), so the base it belongs to is unknown")
    return {"lora": lora_config, "name": meta["adapter_name"], "base_model": lora_config.base_model_name_or_path,
            "base_fingerprint": meta["base_fingerprint"]}


def load_adapter(model: BUSGenUNet, folder: str | Path, name: str | None = None) -> str:
    """Add the adapter stored in `folder` to `model` (under its own name or `name`) and activate it.

    Refuses an adapter trained on other base weights: its low-rank update is a
    correction to those weights and means nothing on others.
    """
    meta = read_adapter_meta(folder)
    fingerprint = base_fingerprint(model)
    if meta["base_fingerprint"] != fingerprint:
        raise DataError(f"{folder}: adapter {meta['name']!r} was trained on another base model "
                         f"({meta['base_model'] or 'unnamed'}, weights {meta['base_fingerprint'][:12]}…), "
                         f"not on this one (weights {fingerprint[:12]}…); load the base it was trained for")
    name = name or meta["name"]
    add_adapter(model, name, meta["lora"])
    result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"), adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if result.unexpected_keys or missing:
        raise DataError(f"{folder}: adapter weights do not fit its configuration: "
                         f"{len(missing)} missing, {len(result.unexpected_keys)} unexpected")
    return name


def merge_adapter(model: BUSGenUNet, name: str) -> BUSGenUNet:
    """A plain BUSGenUNet with adapter `name` folded into its weights (the input model is left as it is)."""
    merged = copy.deepcopy(model)
    use_adapter(merged, name)
    for module_name, layer in _tuner_layers(merged):
        layer.merge(adapter_names=[name])
        parent, _, child = module_name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, child, layer.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


def load_adapted_model(model_dir: str | Path, adapter_dir: str | Path, merge: bool = True) -> BUSGenUNet:
    """Base model folder + adapter folder → a model ready to sample (merged by default)."""
    model = load_model(model_dir)
    name = load_adapter(model, adapter_dir)
    return merge_adapter(model, name) if merge else model


# --------------------------------------------------------------------------- training

def adapt_config(profile: str, **overrides: Any) -> TrainConfig:
    config = TrainConfig(**ADAPT[get_profile(profile).name])
    return check_train_config(replace(config, **overrides) if overrides else config)


def adapt(model_dir: str | Path, manifest: str | Path, name: str, out: str | Path, *,
          adapter_config: AdapterConfig = AdapterConfig(), train_overrides: dict[str, Any] | None = None,
          resume: bool = False, progress: bool = True) -> Path:
    """Train adapter `name` on the manifest's `train` split, the base frozen; returns the adapter folder `out/adapter`.

    Uses the paper's strong augmentation and the base's own condition
    vocabularies (a device the base never saw is an error naming the row). The
    adapter folder also gets a box prior fitted on the adaptation data, since a
    new phenotype (DCIS: wide, flat non-mass lesions) has boxes of its own.
    """
    model_dir, out = Path(model_dir), Path(out)
    check_adapter_name(name)
    model = load_model(model_dir)
    config = adapt_config(model.config.profile, **(train_overrides or {}))
    refuse_overwrite(out, resume)
    accelerator = make_accelerator(config)
    df = read_manifest(manifest)
    dataset, train_df = train_dataset(df, model.config.profile, config, device_vocab=model.config.device_names,
                                      source=manifest, image_size=model.config.image_size)
    prior = fit_box_prior(train_df, manifest)
    check_run_settings(out, {"command": "adapt", "name": name, "base": base_fingerprint(model),
                             "manifest": file_digest(manifest), "lora": asdict(adapter_config), **asdict(config)},
                       resume, write=accelerator.is_main_process)
    folder = out / "adapter"
    if resume and finished(out, config.steps) and (folder / ADAPTER_WEIGHTS_FILE).exists():
        return folder  # a finished run (notebooks call adapt on every run): kept byte-identical, as samples cite it
    accelerator.wait_for_everyone()
    torch.manual_seed(config.seed)
    add_adapter(model, name, adapter_config)
    net = fit(model, dataset, config, out, accelerator, resume=resume, progress=progress, desc=f"adapt {name}")
    if accelerator.is_main_process:
        save_adapter(net, name, folder, base=str(model_dir), extra_files={BOX_PRIOR_FILE: json.dumps(prior.to_json())})
    accelerator.wait_for_everyone()
    return folder
