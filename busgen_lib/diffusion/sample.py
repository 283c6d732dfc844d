"""Sampling BUSGen (§4.3.2): classifier-free guidance (eq. 2) driving a diffusers solver.

The whole algorithm is `sample`'s loop; for conditions c and guidance weight w:

    x_T ~ N(0, I)
    for t in the solver's timesteps (T − 1 first):
        ε̃   = (1 + w) ε_θ(x_t, t, c) − w ε_θ(x_t, t)          eq. 2: classifier-free guidance (`cfg_eps`)
        ε̃  += cond_fn(x_t, t, ε̃)                              further guidance, e.g. CPSample (privacy.py)
        x̂_0 = (x_t − √(1 − ᾱ_t) ε̃) / √ᾱ_t, clipped to [−1, 1]  the clean image that ε̃ points at
        x_t' = solver step from x_t toward x̂_0 (t' < t)        diffusers: DPM-Solver++ or DDPM
    return x_0

The solvers are diffusers' schedulers, built `from_config` of the training DDPM
scheduler so that they share its β's, and given x̂_0 (`prediction_type="sample"`):

* "dpmsolver++-singlestep": `DPMSolverSinglestepScheduler`, the reference (order 3, 50 steps);
* "dpmsolver++": `DPMSolverMultistepScheduler` (diffusers' default sampler, order 2: "2M");
* "unipc": `UniPCMultistepScheduler` (predictor–corrector, x̂_0 form, bh2);
* "ddim": DDIM with η = 0, the first-order probability-flow step (as first-order DPM-Solver++);
* "ddpm": `DDPMScheduler`, the ancestral sampler, as a slow reference (the only stochastic one).

Which of them at how many steps is worth its time is measured by
`experiments/solver_sweep.py` (bench/solver_sweep.py); the profiles' defaults
sit at its knee.

DPM-Solver++ is itself written in x̂_0 (it extrapolates the x̂_0 of the last
steps), so handing it x̂_0 changes nothing in its update; what it makes visible
is the clipping, which diffusers would otherwise apply inside the step.
`clip_x0=False` leaves the solvers exact (analytic tests). These are
variance-preserving solvers: the start noise has σ = 1 and they need no input
scaling (their `init_noise_sigma` is 1 and `scale_model_input` the identity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

from busgen_lib.diffusion.schedule import UNET_CONDITIONS, ScheduleConfig, ddpm_scheduler
from busgen_lib.diffusion.speed import FP32, Speed

SAMPLERS = ("dpmsolver++-singlestep", "dpmsolver++", "unipc", "ddim", "ddpm")
COND_KEYS = UNET_CONDITIONS  # a model's `condition_keys`, where it has them, name its own

CondFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None


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
    speed: Speed = FP32,
) -> torch.Tensor:
    """Draw one image per row of `cond` (pathology, device, boxes, box_valid, optional box_mask; for CoLDiT:
    birads) → (B, 1, S, S).

    The loop is the algorithm of the module docstring. The network runs under
    `inference_mode` and `speed`'s autocast (pass a model prepared with
    `speed.prepare`); `cond_fn` runs outside both, so it may differentiate with
    respect to x_t. For noise that
    belongs to a sample rather than to a batch, pass `seeds` (one per sample) or
    a list of generators. The model runs in eval mode (no condition dropout) and is restored after.
    """
    keys = getattr(model, "condition_keys", COND_KEYS)
    batch = cond[keys[0]].shape[0]
    generator = _generators(generator, seeds, batch=batch)
    size = model.config.image_size
    # A latent model (CoLDiT) is diffused in its latents and decoded at the end; x̂_0 is clipped in pixels only.
    decode = getattr(model, "decode", None)
    shape = model.latent_shape if decode is not None else (1, size, size)
    device = cond[keys[0]].device
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    solver = make_scheduler(model.config, sampler, steps, order)
    alpha_bar = solver.alphas_cumprod.to(device)
    noise = {"generator": generator} if sampler == "ddpm" else {}  # the deterministic solvers draw nothing

    was_training = model.training
    model.eval()
    try:
        x = randn_tensor((batch, *shape), generator=generator, device=device, dtype=dtype)
        for t in tqdm(solver.timesteps, desc=f"{sampler} sampling", disable=not progress):
            with torch.inference_mode(), speed.autocast(device):
                eps = cfg_eps(model, speed.layout(x), t, cond, guidance)           # eq. 2
            eps = eps.to(dtype=x.dtype, copy=True)  # an ordinary tensor again: cond_fn and autograd may use it
            if cond_fn is not None:
                eps = eps + cond_fn(x, t, eps)                                     # e.g. CPSample
            x0 = (x - (1 - alpha_bar[t]).sqrt() * eps) / alpha_bar[t].sqrt()       # x̂_0 that ε̃ implies
            if clip_x0 and decode is None:
                x0 = x0.clamp(-1.0, 1.0)
            x = solver.step(x0.to(x.dtype), t, x, **noise).prev_sample  # x_t → x_t'
        if decode is not None:
            with torch.inference_mode(), speed.autocast(device):
                x = decode(x).to(dtype)
    finally:
        model.train(was_training)
    return x.clamp(-1.0, 1.0) if clip_x0 else x


# --------------------------------------------------------------------------- guidance

def cfg_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor | int, cond: Mapping[str, torch.Tensor | None],
            w: float) -> torch.Tensor:
    """Eq. 2: ε̃_θ(x_t, t, c) = (1 + w) ε_θ(x_t, t, c) − w ε_θ(x_t, t).

    Both branches run in one batched forward: the batch is doubled and its second
    half gets `force_drop`, so the model's own null conditions give ε_θ(x_t, t).
    w = 0 needs no unconditional branch and returns ε_θ(x_t, t, c) itself. The
    combination is computed in x's dtype, whatever precision the network ran in.
    """
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device).expand(batch)
    cond = {k: cond[k] for k in getattr(model, "condition_keys", COND_KEYS) if cond.get(k) is not None}
    if w == 0:
        return model(x, t, **cond).to(x.dtype)
    doubled = {k: torch.cat((v, v)) for k, v in cond.items()}
    force_drop = torch.arange(2 * batch, device=x.device) >= batch
    eps_cond, eps_uncond = model(torch.cat((x, x)), torch.cat((t, t)), **doubled, force_drop=force_drop
                                 ).to(x.dtype).chunk(2)
    return (1 + w) * eps_cond - w * eps_uncond


# --------------------------------------------------------------------------- solvers and noise

def make_scheduler(config: ScheduleConfig, sampler: str, steps: int, order: int = 3) -> SchedulerMixin:
    """A diffusers solver on the training β's that takes x̂_0, with `steps` timesteps set (starting at t = T − 1)."""
    base = ddpm_scheduler(config).config
    if sampler == "ddpm":
        # "trailing" so that a shortened chain still starts from pure noise at t = T − 1.
        scheduler = DDPMScheduler.from_config(base, prediction_type="sample", timestep_spacing="trailing")
    elif sampler == "dpmsolver++":
        scheduler = DPMSolverMultistepScheduler.from_config(
            base, prediction_type="sample", algorithm_type="dpmsolver++", solver_order=order,
            timestep_spacing="linspace")
    elif sampler == "dpmsolver++-singlestep":
        # lower_order_final handles step counts that are not a multiple of the order.
        scheduler = DPMSolverSinglestepScheduler.from_config(
            base, prediction_type="sample", algorithm_type="dpmsolver++", solver_order=order, lower_order_final=True)
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler.from_config(
            base, prediction_type="sample", predict_x0=True, solver_order=order, timestep_spacing="linspace")
    elif sampler == "ddim":
        # DDIM (η = 0) is first-order DPM-Solver++ (the same update, Lu et al. 2022). diffusers' DDIMScheduler is
        # not used: it takes the previous timestep as t − T // steps, wrong when `steps` does not divide T.
        scheduler = DPMSolverMultistepScheduler.from_config(
            base, prediction_type="sample", algorithm_type="dpmsolver++", solver_order=1, timestep_spacing="linspace")
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


def per_sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: sample i's noise depends on seeds[i] only (not on batch or device)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _generators(generator: Generators, seeds: Sequence[int] | None, batch: int) -> Generators:
    if seeds is not None:
        if generator is not None:
            raise ValueError("pass either seeds or generator, not both")
        generator = per_sample_generators(seeds)
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators/seeds for a batch of {batch} conditions")
    return generator
