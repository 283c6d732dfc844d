"""Issue 15, cheaper evaluations: every speed option of the sampler gives the fp32 reference's images.

Tolerances: `inference_mode` is the same arithmetic as `no_grad` (bitwise equal);
channels-last and compile reorder fp32 sums (per guided evaluation 1e-5, the bound of
batched vs separate CFG forwards; over a chain no more than another batch size changes
an image, the 5e-4 of test_samplers.py); bf16
keeps 8 significant bits (bounds below, relative to the image range [-1, 1]).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from busgen_lib.diffusion.model import build_model
from busgen_lib.diffusion.sample import cfg_eps, sample
from busgen_lib.diffusion.speed import Speed
from busgen_lib.errors import UsageError

from reference_schedule import Schedule
from test_samplers import COV, DEVICES, MEANS, alpha_bar_numpy, classes, network_cond


@pytest.fixture(scope="module")
def smoke_net():
    """A fresh smoke-profile network: convolutions for channels-last and bf16 to act on."""
    torch.manual_seed(0)
    return build_model("smoke", DEVICES).eval()


class LinearGaussianEps(nn.Module):
    """The exact ε-predictor of one Gaussian class (test_samplers.GaussianEps with one mean) as an fp32 `F.linear`:
    ε = √(1−ᾱ) S⁻¹ (x_t − √ᾱ μ) with S = ᾱΣ + (1−ᾱ)I. The map is built in float64; the linear layer is
    the op that autocast runs in bf16 and inductor compiles, as in the real network."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.config = Schedule()
        self.mean, self.cov = mean.double(), cov.double()
        self.alpha_bar = torch.from_numpy(alpha_bar_numpy())

    def forward(self, x_t, t, pathology, device=None, boxes=None, box_valid=None, box_mask=None, force_drop=None):
        ab = self.alpha_bar[int(torch.as_tensor(t).reshape(-1)[0])]
        weight = (1 - ab).sqrt() * torch.linalg.inv(ab * self.cov + (1 - ab) * torch.eye(4, dtype=torch.float64))
        bias = -weight @ (ab.sqrt() * self.mean)
        return F.linear(x_t.flatten(1), weight.float(), bias.float()).view_as(x_t)


SEEDS = list(range(64))
EXACT = dict(sampler="dpmsolver++", steps=20, order=2, guidance=1.8, seeds=SEEDS, progress=False)


def exact_images(speed: Speed = Speed()) -> torch.Tensor:
    model = LinearGaussianEps(MEANS[0], COV)
    return sample(speed.prepare(model), classes([1] * len(SEEDS)), speed=speed, **EXACT)


def test_inference_mode_gives_the_images_of_no_grad(monkeypatch, smoke_net):
    kwargs = dict(sampler="dpmsolver++", steps=3, order=2, guidance=1.8, seeds=[1, 2], progress=False)
    fast = sample(smoke_net, network_cond(2), **kwargs)
    monkeypatch.setattr(torch, "inference_mode", torch.no_grad)
    assert torch.equal(sample(smoke_net, network_cond(2), **kwargs), fast)


def test_cond_fn_can_differentiate_through_x_t_and_the_guided_noise(smoke_net):
    """CPSample-style hooks take gradients outside the network's inference_mode; ε̃ must be usable in them."""
    seen = []

    def hook(x, t, eps):
        x = x.detach().requires_grad_()
        energy = (cfg_eps(smoke_net, x, t, network_cond(x.shape[0]), 0.0) * eps).sum()
        (grad,) = torch.autograd.grad(energy, x)
        seen.append(grad.abs().sum().item())
        return torch.zeros_like(eps)

    plain = sample(smoke_net, network_cond(2), sampler="dpmsolver++", steps=2, order=2, seeds=[1, 2],
                   progress=False)
    hooked = sample(smoke_net, network_cond(2), sampler="dpmsolver++", steps=2, order=2, seeds=[1, 2],
                    progress=False, cond_fn=hook)
    assert len(seen) == 2 and all(g > 0 for g in seen)
    assert torch.equal(hooked, plain)


def test_channels_last_gives_the_fp32_images(smoke_net):
    x, t, cond = torch.randn(3, 1, 32, 32), torch.tensor(200), network_cond(3)
    kwargs = dict(sampler="dpmsolver++", steps=3, order=2, guidance=1.8, seeds=[1, 2, 3], progress=False)
    with torch.no_grad():
        eps = cfg_eps(smoke_net, x, t, cond, 1.8)
        images = sample(smoke_net, cond, **kwargs)
    fast = Speed(channels_last=True)
    network = fast.prepare(smoke_net)
    try:
        assert any(p.dim() == 4 and not p.is_contiguous() for p in network.parameters())  # NHWC weights
        with torch.no_grad():
            torch.testing.assert_close(cfg_eps(network, fast.layout(x), t, cond, 1.8), eps, rtol=0, atol=1e-5)
        torch.testing.assert_close(sample(network, cond, speed=fast, **kwargs), images, rtol=0, atol=5e-4)
    finally:
        smoke_net.to(memory_format=torch.contiguous_format)


def test_bf16_stays_within_its_rounding_of_the_fp32_images_of_the_exact_model():
    reference, fast = exact_images(), exact_images(Speed(precision="bf16"))
    difference = (fast - reference).abs()
    # bf16 rounds inputs and weights to 2^-9 relative; |ε| ≈ 1–3, so each ε carries ≈ 1e-2 of error, which
    # DPM-Solver++ averages over steps (measured here: max 0.007, mean 0.0009). Bound: 0.02 = 1 % of the
    # image range [-1, 1], under 3 of 255 grey levels; the mean 0.004 ≈ half a grey level. fp32: 1e-6.
    assert difference.max() < 0.02
    assert difference.mean() < 0.004
    assert difference.max() > 1e-4  # bf16 did act: a no-op option would pass the bounds above


def test_bf16_network_evaluation_is_within_its_rounding(smoke_net):
    x, t, cond = torch.randn(3, 1, 32, 32), torch.tensor(200), network_cond(3)
    with torch.no_grad():
        eps = cfg_eps(smoke_net, x, t, cond, 1.8)
        with Speed(precision="bf16").autocast("cpu"):
            fast = cfg_eps(smoke_net, x, t, cond, 1.8)
    assert fast.dtype == torch.float32  # eq. 2's combination in fp32
    relative = ((fast - eps).norm() / eps.norm()).item()
    # a few bf16 layers in a row, each 2^-9 ≈ 0.2 % relative: a few % at most; 0 would mean no bf16 at all
    assert 1e-4 < relative < 0.05


def _c_compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.slow
@pytest.mark.skipif(_c_compiler() is None, reason="torch.compile's inductor backend needs a C++ compiler on CPU")
def test_compiled_network_gives_the_fp32_images_of_the_exact_model():
    speed = Speed(compile=True)
    network = speed.prepare(LinearGaussianEps(MEANS[0], COV))
    assert isinstance(network, torch._dynamo.eval_frame.OptimizedModule)
    fast = sample(network, classes([1] * len(SEEDS)), speed=speed, **EXACT)
    torch.testing.assert_close(fast, exact_images(), rtol=0, atol=1e-5)


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown --precision 'fp16'; choose one of fp32, bf16"):
        Speed(precision="fp16")
