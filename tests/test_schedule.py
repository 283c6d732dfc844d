"""The diffusion schedule every profile trains with is the reference's, and eq. 1's loss can be minimised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busgen_lib.diffusion.model import build_model
from busgen_lib.diffusion.schedule import ddpm_scheduler, diffusion_loss
from busgen_lib.profiles import PROFILES

DEVICES = ("device-a", "device-b")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_uses_the_reference_schedule(profile):
    # The reference release: T = 500 steps, β linear from 1e-4 to 0.028 (its config files), written out here.
    betas = np.linspace(1e-4, 0.028, 500)
    with torch.device("meta"):  # the profile's network as it is configured, without allocating its weights
        model = build_model(profile, DEVICES)
    scheduler = ddpm_scheduler(model.config)
    assert scheduler.config.num_train_timesteps == 500
    assert scheduler.betas.numpy() == pytest.approx(betas, rel=1e-6)
    assert scheduler.alphas_cumprod.numpy() == pytest.approx(np.cumprod(1.0 - betas), rel=1e-5)
    assert float(scheduler.alphas_cumprod[-1]) == pytest.approx(np.prod(1.0 - betas), rel=1e-5)  # ≈ 9e-4: x_T ~ noise


def test_the_loss_falls_when_one_batch_is_overfitted():
    torch.manual_seed(0)
    model = build_model("smoke", DEVICES, image_size=16, block_out_channels=(8, 16), norm_num_groups=4,
                        mid_attention=False, attention_levels=(False, False), p_uncond=0.0)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(4, 1, 16, 16, generator=g) * 2 - 1, "pathology": torch.tensor([1, 2, 3, 2]),
             "device": torch.tensor([1, 2, 1, 2]), "boxes": torch.tensor([[[0.2, 0.2, 0.6, 0.7]] * 4] * 4),
             "box_valid": torch.tensor([[True, False, False, False]] * 4)}
    scheduler = ddpm_scheduler(model.config)

    def loss() -> torch.Tensor:  # the same t and ε every call: one fixed batch to overfit
        return diffusion_loss(model, batch, torch.Generator().manual_seed(2), scheduler)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(loss())
    for _ in range(40):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss())
    assert before == pytest.approx(1.0, abs=0.5)  # an untrained ε-predictor is off by about the noise itself
    assert after < 0.3 * before
