"""The forward (noising) process and the training loss of BUSGen (§4.3.1, eq. 1).

The linear β schedule and q(x_t | x_0) come from diffusers' `DDPMScheduler`,
so that training and every sampler (which are built `from_config` of the same
scheduler) share one set of β's. Reference: T = 500, β linear in [1e-4, 0.028].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Mapping, Protocol

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn


UNET_CONDITIONS = ("pathology", "device", "boxes", "box_valid", "box_mask")  # BUSGen's; CoLDiT's: ("birads",)


class ScheduleConfig(Protocol):
    num_train_timesteps: int
    beta_start: float
    beta_end: float


def ddpm_scheduler(config: ScheduleConfig) -> DDPMScheduler:
    """The training schedule: β_t linear from beta_start to beta_end over T = num_train_timesteps steps.

    `clip_sample` is off here; samplers decide about clipping (see `sample.py`).
    """
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def q_sample(scheduler: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, i.e. a draw of q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I)."""
    return scheduler.add_noise(x0, noise, t)


def diffusion_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    scheduler: DDPMScheduler | None = None,
    offset_noise: float = 0.0,
    conditions: Sequence[str] = UNET_CONDITIONS,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eq. 1: L = E_{x, ε, t} ‖ε − ε_θ(x_t, t, c)‖², t uniform over the T training steps, ε ~ N(0, I).

    Timesteps are indexed 0..T−1 as in diffusers (the paper's 1..T). The batch is
    the dataset's dict (image in [-1, 1] plus the conditions); condition dropout
    for classifier-free guidance happens inside the model while it is in training
    mode. `generator` (on any device) makes t and ε reproducible.

    `offset_noise` = s > 0 adds s·η, one N(0, 1) draw per image and channel, to
    every pixel of ε (Guttenberg, 2023, "Diffusion with offset noise"). Why: with
    i.i.d. noise the image mean is barely hidden — at t = T its noise has std
    1/S over S² pixels, against a leaked signal sqrt(ᾱ_T)·mean — so the model
    learns to read brightness off x_t and never from the conditions; sampling
    starts from pure noise, where nothing is there to read, and every device
    comes out with the same grey level. The offset hides the mean for most of
    the schedule, so gain and dynamic range have to come from the device label.

    `conditions` names the batch fields the network takes (by keyword); `encode`
    maps images to the space diffused in (a latent model's frozen encoder, CoLDiT).
    """
    scheduler = scheduler or ddpm_scheduler(model.config)
    x0 = batch["image"] if encode is None else encode(batch["image"])
    draw_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                      device=draw_device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=generator, device=draw_device,
                                                   dtype=x0.dtype)
    noise = noise.to(x0.device)
    x_t = q_sample(scheduler, x0, t, noise)
    eps = model(x_t, t, **{k: batch.get(k) for k in conditions})
    return F.mse_loss(eps.float(), noise.float())
