"""Noise schedule, guidance and samplers, checked against closed forms.

The samplers are driven by the exact ε-predictor of Gaussian data: for
x_0 ~ N(μ, Σ), x_t ~ N(sqrt(ᾱ) μ, S) with S = ᾱ Σ + (1 − ᾱ) I, and
E[ε | x_t] = sqrt(1 − ᾱ) S⁻¹ (x_t − sqrt(ᾱ) μ). A correct sampler then turns
N(0, I) noise into N(μ, Σ), up to its discretisation error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import busgen_lib.diffusion.sample as sampling
from busgen_lib.diffusion.model import build_model
from busgen_lib.diffusion.sample import cfg_eps, make_scheduler, sample
from busgen_lib.diffusion.schedule import ddpm_scheduler, diffusion_loss, q_sample

from reference_schedule import BETA_END, BETA_START, T, Schedule

DEVICES = tuple(f"device-{i}" for i in range(3))


def alpha_bar_numpy() -> np.ndarray:
    """ᾱ_t = Π_{s≤t} (1 − β_s), computed independently of diffusers."""
    return np.cumprod(1.0 - np.linspace(BETA_START, BETA_END, T, dtype=np.float64))


# --------------------------------------------------------------------------- schedule


def test_alpha_bar_matches_an_independent_cumprod():
    ab = ddpm_scheduler(Schedule()).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ab, alpha_bar_numpy(), rtol=2e-5)


@pytest.mark.parametrize("t", [0, 60, 250, 499])
def test_forward_noising_matches_q_xt_given_x0(t):
    n = 100_000
    x0 = torch.tensor([[-0.9, -0.2], [0.4, 1.0]]).expand(n, 1, 2, 2)
    gen = torch.Generator().manual_seed(t)
    x_t = q_sample(ddpm_scheduler(Schedule()), x0, torch.full((n,), t), torch.randn(x0.shape, generator=gen)).double()
    ab = alpha_bar_numpy()[t]
    mean, var = x_t.mean(0).numpy(), x_t.var(0).numpy()
    mean_se, var_se = np.sqrt((1 - ab) / n), (1 - ab) * np.sqrt(2 / n)
    assert np.all(np.abs(mean - np.sqrt(ab) * x0[0].numpy()) < 5 * mean_se)
    assert np.all(np.abs(var - (1 - ab)) < 5 * var_se)


class Recorder(nn.Module):
    """A 'model' that predicts ε = 0 and remembers what it was given."""

    config = Schedule()

    def forward(self, x_t, t, pathology, device, boxes=None, box_valid=None, box_mask=None):
        self.seen = (x_t, t, pathology)
        return torch.zeros_like(x_t)


def test_diffusion_loss_is_eq1_with_uniform_t_and_gaussian_noise():
    batch = {"image": torch.rand(64, 1, 2, 2) * 2 - 1, "pathology": torch.randint(0, 4, (64,)),
             "device": torch.zeros(64, dtype=torch.long)}
    model = Recorder()
    loss = diffusion_loss(model, batch, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # replay the draws: t first, then ε
    t = torch.randint(0, T, (64,), generator=gen)
    noise = torch.randn(64, 1, 2, 2, generator=gen)
    ab = torch.from_numpy(alpha_bar_numpy()).float()[t].view(-1, 1, 1, 1)
    x_t, t_seen, _ = model.seen
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(x_t, ab.sqrt() * batch["image"] + (1 - ab).sqrt() * noise, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, (noise ** 2).mean())  # ‖ε − 0‖²


def test_offset_noise_adds_one_gaussian_constant_per_image_to_the_target():
    batch = {"image": torch.rand(4096, 1, 2, 2) * 2 - 1, "pathology": torch.randint(0, 4, (4096,)),
             "device": torch.zeros(4096, dtype=torch.long)}
    model = Recorder()
    loss = diffusion_loss(model, batch, generator=torch.Generator().manual_seed(5), offset_noise=0.3)
    gen = torch.Generator().manual_seed(5)  # replay: t, then ε, then one offset per image
    t = torch.randint(0, T, (4096,), generator=gen)
    noise = torch.randn(4096, 1, 2, 2, generator=gen) + 0.3 * torch.randn(4096, 1, 1, 1, generator=gen)
    ab = torch.from_numpy(alpha_bar_numpy()).float()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(model.seen[0], ab.sqrt() * batch["image"] + (1 - ab).sqrt() * noise, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, (noise ** 2).mean())
    # the noise the model was given: per-image mean variance 1/4 (four i.i.d. pixels) + 0.3² (the shared offset)
    seen_noise = (model.seen[0] - ab.sqrt() * batch["image"]) / (1 - ab).sqrt()
    assert seen_noise.mean(dim=(1, 2, 3)).var().item() == pytest.approx(0.25 + 0.09, rel=0.08)


# --------------------------------------------------------------------------- the exact Gaussian denoiser

class GaussianEps(nn.Module):
    """The exact ε-predictor for class-conditional Gaussian data on a 2×2 'image'.

    Class k (pathology k ≥ 1) is N(means[k−1], cov); the null condition (pathology 0
    or force_drop) is the equal-weight mixture, whose E[ε | x_t] weights the class
    predictors by their posterior probabilities.
    """

    def __init__(self, means: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.config = Schedule()
        self.means, self.cov = means.double(), cov.double()
        self.alpha_bar = torch.from_numpy(alpha_bar_numpy())

    def forward(self, x_t, t, pathology, device=None, boxes=None, box_valid=None, box_mask=None, force_drop=None):
        x = x_t.flatten(1).double()
        t = torch.as_tensor(t).reshape(-1)
        assert torch.all(t == t[0]), "samplers step the whole batch at one t"
        ab = self.alpha_bar[int(t[0])]
        s_inv = torch.linalg.inv(ab * self.cov + (1 - ab) * torch.eye(x.shape[1], dtype=torch.float64))
        r = x[:, None, :] - ab.sqrt() * self.means[None]  # (B, K, D)
        eps_k = (1 - ab).sqrt() * r @ s_inv
        posterior = (-0.5 * (eps_k * r).sum(-1) / (1 - ab).sqrt()).softmax(-1)
        eps_null = (posterior[..., None] * eps_k).sum(1)
        eps_cond = eps_k[torch.arange(x.shape[0]), (pathology - 1).clamp(min=0)]
        null = pathology == 0 if force_drop is None else (pathology == 0) | force_drop
        return torch.where(null[:, None], eps_null, eps_cond).to(x_t.dtype).view_as(x_t)


A = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.2, 0.4, 0.1, 0.0], [0.0, 0.1, 0.3, 0.1], [0.1, 0.0, 0.2, 0.25]])
COV = (A @ A.T).double()  # variances 0.11–0.26, correlations up to 0.6
MEANS = torch.tensor([[0.5, -0.3, 0.2, -0.6], [-0.4, 0.5, -0.2, 0.3]]).double()


def classes(pathology: list[int]) -> dict[str, torch.Tensor]:
    p = torch.tensor(pathology)
    return {"pathology": p, "device": torch.zeros_like(p)}


def exact_flow_target(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance that the exact probability-flow ODE gives from x_T ~ N(0, I) at t = T−1.

    The flow keeps z = S_T^{-1/2}(x − sqrt(ᾱ_T) μ) fixed, so x_0 = μ + Σ^{1/2} z; the prior
    N(0, I) is not exactly q(x_T) (ᾱ_T ≈ 9e-4), which shifts the mean by a few 1e-3.
    """
    ab = float(alpha_bar_numpy()[-1])
    lam, v = torch.linalg.eigh(COV)
    s = ab * lam + 1 - ab
    gain = v @ torch.diag((lam / s).sqrt()) @ v.T  # Σ^{1/2} S_T^{-1/2}
    return mean - gain @ (ab ** 0.5 * mean), v @ torch.diag(lam / s) @ v.T


def push_basis(monkeypatch, model, pathology: list[int], **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run a deterministic sampler on x_T ∈ {0, e_1..e_4} per class → exact (mean, covariance) of its output.

    With an affine ε-predictor a deterministic solver is an affine map x_0 = M x_T + b,
    so x_T ~ N(0, I) gives N(b, M Mᵀ): no sampling error left, only the solver's own.
    """
    basis = torch.cat((torch.zeros(1, 4), torch.eye(4))).view(5, 1, 2, 2)
    monkeypatch.setattr(sampling, "randn_tensor", lambda shape, **kw: basis.repeat(len(pathology), 1, 1, 1))
    x = sample(model, classes([p for p in pathology for _ in range(5)]), clip_x0=False, progress=False,
               **kwargs).flatten(1).double()
    out = []
    for k in range(len(pathology)):
        b, m = x[5 * k], (x[5 * k + 1: 5 * k + 5] - x[5 * k]).T
        out.append((b, m @ m.T))
    return out


# --------------------------------------------------------------------------- samplers vs the closed form

def test_ddpm_ancestral_sampling_reproduces_gaussian_data():
    n = 4000
    model = GaussianEps(MEANS[:1], COV)
    x = sample(model, classes([1] * n), sampler="ddpm", steps=T, guidance=0.0, clip_x0=False, progress=False,
               generator=torch.Generator().manual_seed(0)).flatten(1).double()
    mean_target, cov_target = exact_flow_target(MEANS[0])  # the same N(0, I) prior mismatch as any sampler
    var = torch.diag(COV)
    mean_se = (var / n).sqrt()
    cov_se = ((var[:, None] * var[None, :] + COV ** 2) / n).sqrt()  # SE of a sample covariance
    # DDPM with β̃ posterior variances also loses a little variance per step (measured with 1e5 samples: 0.003–0.006).
    assert torch.all((x.mean(0) - mean_target).abs() < 5 * mean_se)
    assert torch.all((torch.cov(x.T) - cov_target).abs() < 5 * cov_se + 0.01)


@pytest.mark.parametrize(("sampler", "order", "steps", "tol"), [
    ("dpmsolver++", 2, 20, 0.02),
    ("dpmsolver++-singlestep", 3, 20, 0.04),  # only 7 third-order macro-steps of 3 evaluations
    ("dpmsolver++-singlestep", 3, 50, 0.01),  # the reference setting
    ("dpmsolver++", 2, 100, 0.003),  # converges: error shrinks with the step count
    ("unipc", 2, 20, 0.02),
    ("unipc", 2, 100, 0.003),
    ("ddim", 1, 100, 0.03),  # first order: slower convergence than the others
    ("ddim", 1, 500, 0.006),
])
def test_dpm_solver_transports_noise_to_gaussian_data(monkeypatch, sampler, order, steps, tol):
    model = GaussianEps(MEANS[:1], COV)
    ((mean, cov),) = push_basis(monkeypatch, model, [1], sampler=sampler, steps=steps, order=order, guidance=0.0)
    mean_target, cov_target = exact_flow_target(MEANS[0])
    assert (mean - mean_target).abs().max() < tol / 2
    assert (cov - cov_target).abs().max() < tol


def test_ddim_error_falls_like_a_first_order_method(monkeypatch):
    """Halving DDIM's step size roughly halves its error (order 1); DPM-Solver++ 2M's falls faster."""
    model = GaussianEps(MEANS[:1], COV)
    _, cov_target = exact_flow_target(MEANS[0])

    def error(sampler: str, order: int, steps: int) -> float:
        ((_, cov),) = push_basis(monkeypatch, model, [1], sampler=sampler, steps=steps, order=order, guidance=0.0)
        return float((cov - cov_target).abs().max())

    assert 1.7 < error("ddim", 1, 50) / error("ddim", 1, 100) < 2.3
    assert error("dpmsolver++", 2, 50) / error("dpmsolver++", 2, 100) > 2.5


@pytest.mark.parametrize("steps", [7, 15, 50])  # 7 and 15 do not divide T
def test_ddim_step_is_the_closed_form_update(steps):
    """x_t' = √ᾱ_t' x̂_0 + √(1 − ᾱ_t') (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t) (Song et al. 2021, eq. 12 with σ = 0)."""
    solver = make_scheduler(Schedule(), "ddim", steps)
    ab = torch.from_numpy(alpha_bar_numpy())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64)
    timesteps = [int(t) for t in solver.timesteps]
    assert timesteps[0] == T - 1 and len(timesteps) == steps
    for t, t_next in zip(timesteps, timesteps[1:] + [None]):
        x0 = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64)
        ab_next = torch.tensor(1.0, dtype=torch.float64) if t_next is None else ab[t_next]
        expected = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        # diffusers keeps its σ's in float32: agreement to float32 precision, one step at a time.
        torch.testing.assert_close(solver.step(x0, t, x).prev_sample, expected, rtol=1e-4, atol=1e-5)
        x = expected


def test_guidance_zero_samples_each_class_from_its_own_distribution(monkeypatch):
    model = GaussianEps(MEANS, COV)
    results = push_basis(monkeypatch, model, [1, 2], sampler="dpmsolver++", steps=20, order=2, guidance=0.0)
    for (mean, cov), class_mean in zip(results, MEANS):
        mean_target, cov_target = exact_flow_target(class_mean)
        assert (mean - mean_target).abs().max() < 0.01
        assert (cov - cov_target).abs().max() < 0.02


def test_cond_fn_adjusts_the_guided_noise(monkeypatch):
    """A hook that adds (ε_class2 − ε̃) makes class-1 requests sample class 2: the hook's output reaches the solver."""
    model = GaussianEps(MEANS, COV)

    def steer(x, t, eps):
        return model(x, t, torch.full((x.shape[0],), 2)) - eps

    ((mean, cov),) = push_basis(monkeypatch, model, [1], sampler="dpmsolver++", steps=20, order=2, guidance=1.8,
                                cond_fn=steer)
    mean_target, cov_target = exact_flow_target(MEANS[1])
    assert (mean - mean_target).abs().max() < 0.01
    assert (cov - cov_target).abs().max() < 0.02


# --------------------------------------------------------------------------- guidance on the real network

@pytest.fixture(scope="module")
def smoke_model():
    torch.manual_seed(0)
    return build_model("smoke", DEVICES).eval()


def network_cond(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    boxes = torch.tensor([[0.2, 0.3, 0.6, 0.7], [0, 0, 0, 0]]).expand(batch, 2, 4).clone()
    return {"pathology": torch.randint(1, 4, (batch,), generator=g),
            "device": torch.randint(1, len(DEVICES) + 1, (batch,), generator=g),
            "boxes": boxes, "box_valid": torch.tensor([[True, False]] * batch)}


def test_cfg_with_w_zero_is_the_conditional_prediction(smoke_model):
    x, t, cond = torch.randn(3, 1, 32, 32), torch.tensor(200), network_cond(3)
    with torch.no_grad():
        assert torch.equal(cfg_eps(smoke_model, x, t, cond, 0.0), smoke_model(x, t.expand(3), **cond))


def test_cfg_is_eq2_of_separate_conditional_and_unconditional_forwards(smoke_model):
    x, t, cond, w = torch.randn(3, 1, 32, 32), torch.tensor(200), network_cond(3), 1.8
    with torch.no_grad():
        guided = cfg_eps(smoke_model, x, t, cond, w)
        eps_c = smoke_model(x, t.expand(3), **cond)
        eps_u = smoke_model(x, t.expand(3), **cond, force_drop=torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(eps_c, eps_u, atol=1e-4)
    torch.testing.assert_close(guided, (1 + w) * eps_c - w * eps_u, rtol=0, atol=1e-5)


class Halve(nn.Module):
    """ε = x / 2, computed row by row: bitwise the same whatever the batch."""

    config = Schedule()

    def forward(self, x_t, t, pathology, device=None, boxes=None, box_valid=None, box_mask=None, force_drop=None):
        return x_t / 2


@pytest.mark.parametrize("sampler", ["dpmsolver++-singlestep", "dpmsolver++", "unipc", "ddim", "ddpm"])
def test_sample_i_gets_the_same_noise_in_any_batch(sampler):
    kwargs = dict(sampler=sampler, steps=5, order=3, guidance=0.0, progress=False, clip_x0=False)
    in_batch = sample(Halve(), classes([1, 2, 3, 1]), seeds=[10, 11, 12, 13], **kwargs)
    alone = sample(Halve(), classes([3]), seeds=[12], **kwargs)
    assert torch.equal(alone[0], in_batch[2])
    assert not torch.allclose(in_batch[1], in_batch[2])


@pytest.mark.parametrize("sampler", ["dpmsolver++-singlestep", "ddpm"])
def test_sample_i_depends_on_its_seed_only(smoke_model, sampler):
    cond4 = network_cond(4)
    cond1 = {k: v[2:3] for k, v in cond4.items()}
    kwargs = dict(sampler=sampler, steps=3, order=3, guidance=1.8, progress=False)
    in_batch = sample(smoke_model, cond4, seeds=[10, 11, 12, 13], **kwargs)
    alone = sample(smoke_model, cond1, seeds=[12], **kwargs)
    assert in_batch.shape == (4, 1, 32, 32)
    # same noise; the network's kernels may round differently for another batch size (seen: 4e-5)
    torch.testing.assert_close(alone[0], in_batch[2], rtol=0, atol=5e-4)
    assert not torch.allclose(in_batch[1], in_batch[2], atol=1e-2)


def test_sample_restores_training_mode(smoke_model):
    smoke_model.train()
    try:
        sample(smoke_model, network_cond(1), seeds=[0], steps=2, order=2, sampler="dpmsolver++", progress=False)
        assert smoke_model.training
    finally:
        smoke_model.eval()
