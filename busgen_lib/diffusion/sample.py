"""Sampling BUSGen (§4.3.2): classifier-free guidance (eq. 2) driving diffusers' solvers.

The solvers are diffusers' schedulers, built `from_config` of the training
DDPM scheduler so that they share its β's:

* "dpmsolver++-singlestep": `DPMSolverSinglestepScheduler`, the reference (order 3, 50 steps);
* "dpmsolver++": `DPMSolverMultistepScheduler` (diffusers' default sampler, order 2);
* "ddpm": `DDPMScheduler.step`, the ancestral sampler, as a slow reference.

What is ours is the guidance and the loop. Guidance meets in one place: the
guided noise of eq. 2 (`cfg_eps`) plus an optional `cond_fn(x_t, t, eps)` hook
whose output is added to ε — the guided-diffusion way of plugging in further
guidance (e.g. CPSample privacy guidance) without copying the sampler.

Clipping: with `clip_x0=True` (default) every x_0 prediction is clipped to
[-1, 1] (DDPM `clip_sample`, DPM-Solver++ `thresholding` with
`sample_max_value=1`, which reduces dynamic thresholding to a static clip) and
the result is clamped; `clip_x0=False` leaves the solvers exact (analytic tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

from busgen_lib.diffusion.schedule import ScheduleConfig, ddpm_scheduler

SAMPLERS = ("dpmsolver++-singlestep", "dpmsolver++", "ddpm")
COND_KEYS = ("pathology", "device", "boxes", "box_valid", "box_mask")

CondFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None


# --------------------------------------------------------------------------- guidance

def cfg_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor | int, cond: Mapping[str, torch.Tensor | None],
            w: float) -> torch.Tensor:
    """Eq. 2: ε̃_θ(x_t, t, c) = (1 + w) ε_θ(x_t, t, c) − w ε_θ(x_t, t).

    Both branches run in one batched forward: the batch is doubled and its second
    half gets `force_drop`, so the model's own null conditions give ε_θ(x_t, t).
    w = 0 needs no unconditional branch and returns ε_θ(x_t, t, c) itself.
    """
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device).expand(batch)
    cond = {k: cond[k] for k in COND_KEYS if cond.get(k) is not None}
    if w == 0:
        return model(x, t, **cond)
    doubled = {k: torch.cat((v, v)) for k, v in cond.items()}
    force_drop = torch.arange(2 * batch, device=x.device) >= batch
    eps_cond, eps_uncond = model(torch.cat((x, x)), torch.cat((t, t)), **doubled, force_drop=force_drop).chunk(2)
    return (1 + w) * eps_cond - w * eps_uncond


# --------------------------------------------------------------------------- solvers

def make_scheduler(config: ScheduleConfig, sampler: str, steps: int, order: int = 3,
                   clip_x0: bool = True) -> SchedulerMixin:
    """A diffusers sampler on the training β's, with `steps` timesteps set (starting at t = T − 1)."""
    base = ddpm_scheduler(config).config
    if sampler == "ddpm":
        # "trailing" so that a shortened chain still starts from pure noise at t = T − 1.
        scheduler = DDPMScheduler.from_config(base, clip_sample=clip_x0, clip_sample_range=1.0,
                                              timestep_spacing="trailing")
    elif sampler == "dpmsolver++":
        scheduler = DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=order, timestep_spacing="linspace",
            thresholding=clip_x0, sample_max_value=1.0)
    elif sampler == "dpmsolver++-singlestep":
        # lower_order_final handles step counts that are not a multiple of the order.
        scheduler = DPMSolverSinglestepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=order, lower_order_final=True,
            thresholding=clip_x0, sample_max_value=1.0)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


def per_sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: sample i's noise depends on seeds[i] only (not on batch or device)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def _denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor | None],
             w: float) -> torch.Tensor:
    return cfg_eps(model, x, t, cond, w)


def sample(
    model: nn.Module,
    cond: Mapping[str, torch.Tensor | None],
    *,
    sampler: str = "dpmsolver++-singlestep",
    steps: int = 50,
    order: int = 3,
    guidance: float = 1.8,
    generator: Generators = None,
    seeds: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    clip_x0: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Draw one image per row of `cond` (pathology, device, boxes, box_valid, optional box_mask) → (B, 1, S, S).

    Each step evaluates ε̃ of eq. 2 (`cfg_eps`), adds `cond_fn(x_t, t, ε̃)` if
    given, and lets the solver step. `cond_fn` runs outside `no_grad`, so it may
    differentiate with respect to x_t. For noise that belongs to a sample rather
    than to a batch, pass `seeds` (one per sample) or a list of generators.
    The model is run in eval mode (no condition dropout) and restored after.
    """
    if seeds is not None:
        if generator is not None:
            raise ValueError("pass either seeds or generator, not both")
        generator = per_sample_generators(seeds)
    batch = cond["pathology"].shape[0]
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators/seeds for a batch of {batch} conditions")
    config = model.config
    device = cond["pathology"].device
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    scheduler = make_scheduler(config, sampler, steps, order, clip_x0)

    was_training = model.training
    model.eval()
    try:
        shape = (batch, 1, config.image_size, config.image_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        for t in tqdm(scheduler.timesteps, desc=f"{sampler} sampling", disable=not progress):
            eps = _denoise(model, scheduler.scale_model_input(x, t), t, cond, guidance)
            if cond_fn is not None:
                eps = eps + cond_fn(x, t, eps)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    finally:
        model.train(was_training)
    return x.clamp(-1.0, 1.0) if clip_x0 else x
