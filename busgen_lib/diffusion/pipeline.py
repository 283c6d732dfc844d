"""From a trained model folder to a labelled synthetic dataset (the `sample` command).

Joins the pieces: the model and its box prior (checkpoint.py), a generation
plan (plan.py), the guided sampler (sample.py) and the sharded, resumable
writer (generate.py). The requested conditions become the labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from busgen_lib.data.dataset import BIRADS_INDEX, boxes_to_mask
from busgen_lib.data.schema import BIRADS_CLASSES, PATHOLOGIES
from busgen_lib.diffusion.box_prior import BoxPrior
from busgen_lib.diffusion.checkpoint import WEIGHTS_FILE, file_fingerprint, load_generator
from busgen_lib.diffusion.coldit import CoLDiT
from busgen_lib.diffusion.generate import generate_distributed
from busgen_lib.diffusion.lora import ADAPTER_WEIGHTS_FILE, load_adapted_model
from busgen_lib.diffusion.model import SAMPLING_DEFAULTS, BUSGenUNet
from busgen_lib.diffusion.plan import Request, balanced_plan, birads_plan, explicit_birads_plan, explicit_plan
from busgen_lib.diffusion.sample import SAMPLERS, CondFn, sample
from busgen_lib.diffusion.speed import FP32, Speed
from busgen_lib.diffusion.train import BOX_PRIOR_FILE
from busgen_lib.profiles import get_coldit
from busgen_lib.errors import DataError, UsageError


def requests_to_cond(requests: Sequence[Request], model: BUSGenUNet | CoLDiT, device: torch.device | str = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """Condition tensors for a batch of requests, indexed as the training data was (0 = null); a CoLDiT's: BI-RADS."""
    if isinstance(model, CoLDiT):
        return {"birads": torch.tensor([BIRADS_INDEX[r.birads] for r in requests], device=device)}
    config = model.config
    pathology = torch.tensor([PATHOLOGIES.index(r.pathology) + 1 for r in requests])
    devices = torch.tensor([config.device_names.index(r.device) + 1 if r.device else 0 for r in requests])
    boxes = torch.zeros(len(requests), config.max_boxes, 4)
    for i, r in enumerate(requests):
        if len(r.boxes) > config.max_boxes:
            raise ValueError(f"request {r.index}: {len(r.boxes)} boxes, the model takes at most {config.max_boxes}")
        if r.boxes:
            boxes[i, : len(r.boxes)] = torch.tensor(r.boxes, dtype=torch.float32)
    valid = torch.arange(config.max_boxes)[None] < torch.tensor([len(r.boxes) for r in requests])[:, None]
    mask = boxes_to_mask(torch.where(valid[..., None], boxes, 0.0), config.image_size)[:, None]
    cond = {"pathology": pathology, "device": devices, "boxes": boxes, "box_valid": valid, "box_mask": mask}
    return {k: v.to(device) for k, v in cond.items()}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 1, S, S) in [-1, 1] → (B, S, S) uint8, the inverse of the dataset's scaling."""
    return ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def model_sample_fn(model: BUSGenUNet, *, steps: int, guidance: float, sampler: str, order: int,
                    cond_fn: CondFn | None = None, device: torch.device | str = "cpu", speed: Speed = FP32
                    ) -> Callable[[Sequence[Request]], np.ndarray]:
    """A `generate` sample_fn: each request's image depends on its own seed only (per-sample noise).

    The model is prepared for `speed` once, here (channels-last in place, compiled once for all batches).
    """
    network = speed.prepare(model)

    def sample_fn(requests: Sequence[Request]) -> np.ndarray:
        cond = requests_to_cond(requests, model, device)
        images = sample(network, cond, sampler=sampler, steps=steps, order=order, guidance=guidance,
                        seeds=[r.seed for r in requests], cond_fn=cond_fn, progress=False, speed=speed)
        return to_uint8(images)
    return sample_fn


def sample_images(model: BUSGenUNet, requests: Sequence[Request], *, size: int | None = None, batch_size: int = 16,
                  progress: bool = True, **sampling) -> torch.Tensor:
    """(N, 1, S, S) images in [-1, 1] for in-memory evaluation (judges, figures), as the written files would be.

    Goes through the same uint8 quantisation as `sample_dataset`, then resizes
    to `size` (a judge's resolution) like the data layer does (antialiased).
    """
    fn = model_sample_fn(model, **sampling)
    batches = [requests[i: i + batch_size] for i in range(0, len(requests), batch_size)]
    pixels = np.concatenate([fn(b) for b in tqdm(batches, desc="sample", unit="batch", disable=not progress)])
    images = torch.from_numpy(pixels).float()[:, None] / 127.5 - 1.0
    if size is not None and size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return images


def sampling_options(model: BUSGenUNet | CoLDiT, *, steps: int | None = None, guidance: float | None = None,
                     sampler: str | None = None, order: int | None = None) -> dict:
    """The sampler, steps, order and guidance a sample of `model` uses: those given, else its profile's defaults
    (a CoLDiT's own guidance weight)."""
    defaults = SAMPLING_DEFAULTS[model.config.profile]
    default_guidance = get_coldit(model.config.profile).guidance if isinstance(model, CoLDiT) else defaults.guidance
    return {"sampler": sampler or defaults.sampler, "steps": defaults.steps if steps is None else steps,
            "order": order or defaults.order, "guidance": default_guidance if guidance is None else guidance}


def sample_dataset(model_dir: str | Path, n: int, out: str | Path, *, plan: str | Path = "balanced",
                   steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                   order: int | None = None, seed: int = 0, batch_size: int = 16,
                   pathologies: Sequence[str] = PATHOLOGIES, devices: Sequence[str] | None = None,
                   cond_fn: CondFn | None = None, adapter: str | Path | None = None, speed: Speed = FP32,
                   birads: Sequence[str] = BIRADS_CLASSES) -> Path:
    """Generate `n` images (or the rows of an explicit plan CSV) into `out`; returns the merged manifest.

    With `adapter`, the LoRA adapter is merged into the model first and its own
    box prior (fitted on the adaptation data) replaces the base's. Every option
    and plan entry is checked before sampling starts, and `out/settings.json`
    records what determines an image (model and adapter fingerprints, sampler,
    steps, order, guidance, the `cond_fn`'s settings, seed, `speed.settings()`,
    i.e. the precision) so that a rerun with other settings is refused instead
    of mixed in. `speed`'s channels-last and compile change images only at fp32
    rounding level, like the batch size, and are not recorded (speed.py). Under
    `accelerate launch` each process writes its own shard.
    """
    model_dir = Path(model_dir)
    model = load_generator(model_dir) if adapter is None else load_adapted_model(model_dir, adapter)
    latent = isinstance(model, CoLDiT)
    sampling = sampling_options(model, steps=steps, guidance=guidance, sampler=sampler, order=order)
    _check_sampling(sampling, batch_size, seed)
    if latent and cond_fn is not None:
        raise UsageError(f"{model_dir}: a CoLDiT samples latents; CPSample's classifier guides pixels of a BUSGen "
                         "UNet, so it cannot steer this model")
    if latent:  # BI-RADS requests, balanced over `birads` or from a CSV with a birads column
        requests = birads_plan(n, birads, seed) if str(plan) == "balanced" else explicit_birads_plan(plan, seed)
    else:
        requests = _unet_plan(model, Path(adapter or model_dir), plan, n, seed, pathologies, devices)
    settings = {"model": file_fingerprint(model_dir / WEIGHTS_FILE),
                "adapter": None if adapter is None else file_fingerprint(Path(adapter) / ADAPTER_WEIGHTS_FILE),
                **sampling, "seed": seed, "cond_fn": _describe(cond_fn), **speed.settings()}
    device = PartialState(cpu=not torch.cuda.is_available()).device  # this process's GPU under accelerate
    speed.check(device)
    model.to(device)
    fn = model_sample_fn(model, **sampling, cond_fn=cond_fn, device=device, speed=speed)
    source = str(model_dir) if adapter is None else f"{model_dir} + adapter {adapter}"
    return generate_distributed(requests, fn, out, batch_size=batch_size, generator=source,
                                cpu=not torch.cuda.is_available(), settings=settings)


def _check_sampling(sampling: dict, batch_size: int, seed: int) -> None:
    """Refuse settings that would write black or empty images (nan guidance, zero steps) before any model runs."""
    if sampling["sampler"] not in SAMPLERS:
        raise UsageError(f"unknown --sampler {sampling['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    for name, value in (("--steps", sampling["steps"]), ("--batch-size", batch_size), ("solver order", sampling["order"])):
        if int(value) != value or value < 1:
            raise UsageError(f"{name} must be a whole number >= 1, got {value}")
    if not math.isfinite(sampling["guidance"]) or sampling["guidance"] < 0:
        raise UsageError(f"--guidance must be a finite number >= 0 (0: the conditional model alone), "
                         f"got {sampling['guidance']}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")


def _describe(cond_fn: CondFn | None) -> dict | None:
    """What a guidance hook contributes to an image: its own `settings()` (CPSample: classifier fingerprint,
    α, s), else its type's name (a hook without settings cannot be checked beyond that)."""
    if cond_fn is None:
        return None
    if hasattr(cond_fn, "settings"):
        return cond_fn.settings()
    return {"type": f"{type(cond_fn).__module__}.{type(cond_fn).__qualname__}"}


def _unet_plan(model: BUSGenUNet, prior_dir: Path, plan: str | Path, n: int, seed: int,
               pathologies: Sequence[str], devices: Sequence[str] | None) -> list[Request]:
    """BUSGen's requests: balanced over pathology x device with boxes from the box prior, or a plan CSV's rows."""
    prior = BoxPrior.load(prior_dir / BOX_PRIOR_FILE)
    known = model.config.device_names
    if str(plan) == "balanced":
        return balanced_plan(n, pathologies, devices or known or ("",), prior, seed, known_devices=(*known, ""))
    requests = explicit_plan(plan, devices=(*known, ""), seed=seed, box_prior=prior)
    crowded = [r for r in requests if len(r.boxes) > model.config.max_boxes]
    if crowded:
        raise DataError(f"{plan}: row {crowded[0].index + 1}, boxes: {len(crowded[0].boxes)} boxes, but the model "
                        f"takes at most {model.config.max_boxes} per image ({len(crowded)} such row(s)); "
                        "keep the largest ones")
    return requests
