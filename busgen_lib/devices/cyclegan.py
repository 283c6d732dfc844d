"""CycleGAN (Zhu et al. 2017) for device-style translation: BUSGen's device augmentation (§4.3.2).

The paper translates every adaptation image to every device with one CycleGAN
per target device; `translate.py` organises those translators, this module is
one of them: the networks, the losses and a resumable training loop.

Hand-written in torch, following the reference implementation
(junyanz/pytorch-CycleGAN-and-pix2pix): none of our chosen dependencies
(diffusers, timm, torchvision) ships a CycleGAN, a ResNet image-to-image
generator or a PatchGAN discriminator. Images are single-channel grayscale
in [-1, 1], shaped (N, 1, S, S).

Objective (Zhu et al. eq. 3, with the least-squares GAN loss of their
experiments and the identity term of their §5.2), for G: A→B and F: B→A:

    L = L_GAN(G, D_B) + L_GAN(F, D_A) + λ_cyc (|F(G(a)) - a|_1 + |G(F(b)) - b|_1)
        + λ_id (|G(b) - b|_1 + |F(a) - a|_1),      λ_cyc = 10, λ_id = 0.5 λ_cyc.

Everything random (initial weights, batches, image-pool draws) comes from
seeded generators derived from (seed, step), so training is deterministic per
seed on CPU and a run resumed from its checkpoint ends with bit-identical
weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from busgen_lib.atomic import atomic_path
from busgen_lib.data.dataset import derive_seed
from busgen_lib.profiles import CYCLEGAN, get_profile

CHECKPOINT_FILE = "checkpoint.safetensors"


# --------------------------------------------------------------------------- PatchGAN geometry

def patchgan_specs(n_layers: int) -> list[tuple[int, int]]:
    """(kernel, stride) of each conv of an n-layer PatchGAN: n stride-2 4x4 convs, then two stride-1 ones."""
    return [(4, 2)] * n_layers + [(4, 1), (4, 1)]


def receptive_field(specs: list[tuple[int, int]]) -> int:
    """Side of the input patch one output pixel sees: r <- (r - 1) * stride + kernel, from the output back."""
    r = 1
    for kernel, stride in reversed(specs):
        r = (r - 1) * stride + kernel
    return r


def patch_output_size(image_size: int, n_layers: int) -> int:
    """Side of the PatchGAN's output map (every conv pads by 1)."""
    size = image_size
    for kernel, stride in patchgan_specs(n_layers):
        size = (size + 2 - kernel) // stride + 1
    return size



# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class CycleGANConfig:
    """Architecture and optimisation of one translator; defaults per profile in profiles.CYCLEGAN."""

    image_size: int              # square side the translator works at (divisible by 4)
    ngf: int                     # generator width after the first c7s1 layer
    n_blocks: int                # residual blocks at 1/4 resolution (reference: 9 at 256 px)
    ndf: int                     # discriminator width of its first layer
    n_layers: int                # stride-2 layers of the PatchGAN (3: the 70x70 PatchGAN)
    steps: int
    batch_size: int              # reference: 1
    learning_rate: float = 2e-4
    beta1: float = 0.5           # Adam betas (beta1, 0.999) as in the reference
    lambda_cyc: float = 10.0
    lambda_id: float = 5.0       # 0.5 * lambda_cyc
    pool_size: int = 50          # image history of the discriminators (Shrivastava et al. 2017)
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.image_size % 4:
            raise ValueError(f"image_size {self.image_size} must be divisible by 4 (two stride-2 stages)")
        if patch_output_size(self.image_size, self.n_layers) < 1:
            raise ValueError(f"a {self.n_layers}-layer PatchGAN leaves no output at {self.image_size} px; "
                             f"use fewer layers (n_layers) for this image size")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CycleGANConfig:
        return cls(**values)




def cyclegan_config(profile: str, **overrides: Any) -> CycleGANConfig:
    """The profile's translator configuration, optionally with some fields replaced."""
    config = CycleGANConfig(**CYCLEGAN[get_profile(profile).name])
    return replace(config, **overrides) if overrides else config


# --------------------------------------------------------------------------- networks

def _norm(channels: int) -> nn.InstanceNorm2d:
    # The reference's "instance" norm: no affine parameters, no running statistics.
    return nn.InstanceNorm2d(channels)


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 conv + instance-norm layers with a skip connection (R-k of the paper)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """c7s1-k, d2k, d4k, R4k x n_blocks, u2k, uk, c7s1-1 + tanh (Johnson et al. 2016, as in CycleGAN).

    Fully convolutional: the two stride-2 stages need a side divisible by 4.
    Reflection padding avoids the border artefacts zero padding leaves.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, ngf, 7), _norm(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1), _norm(ngf * mult * 2),
                       nn.ReLU(True)]
        layers += [ResidualBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                       _norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """The PatchGAN of Isola et al. 2017: C64-C128-C256-C512 (n_layers=3: 70x70 patches), one logit per patch.

    Widths double per layer up to 8 x ndf; no norm on the first layer; LeakyReLU 0.2.
    Judging patches rather than whole images makes D a texture (style) critic,
    which is what a device is: speckle grain, gain and grey map. Smaller images
    take fewer layers, so that a patch stays a part of the image.
    """

    def __init__(self, ndf: int = 64, n_layers: int = 3, channels: int = 1):
        super().__init__()
        specs = patchgan_specs(n_layers)
        widths = [channels] + [ndf * min(2 ** k, 8) for k in range(n_layers + 1)] + [1]
        layers: list[nn.Module] = []
        for k, (kernel, stride) in enumerate(specs):
            layers.append(nn.Conv2d(widths[k], widths[k + 1], kernel, stride=stride, padding=1))
            if k == len(specs) - 1:
                break
            if k > 0:
                layers.append(_norm(widths[k + 1]))
            layers.append(nn.LeakyReLU(0.2, True))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """The reference's 'normal' init: conv weights N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
            nn.init.zeros_(m.bias)


class CycleGAN(nn.Module):
    """The four networks of one translator: G = g_ab (A→B), F = g_ba (B→A), and D_A, D_B judging each domain."""

    def __init__(self, config: CycleGANConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.g_ab = ResnetGenerator(config.ngf, config.n_blocks)
        self.g_ba = ResnetGenerator(config.ngf, config.n_blocks)
        self.d_a = PatchDiscriminator(config.ndf, config.n_layers)
        self.d_b = PatchDiscriminator(config.ndf, config.n_layers)
        _init_weights(self, torch.Generator().manual_seed(derive_seed(seed, 0x1417)))
        self.train_seconds = 0.0  # wall time of training so far, summed over resumed sessions


# --------------------------------------------------------------------------- losses

def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al. 2017): mean (D(x) - 1)^2 for real targets, mean D(x)^2 for fake."""
    return F.mse_loss(prediction, torch.full_like(prediction, 1.0 if target_is_real else 0.0))


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Half the sum of the real and fake LSGAN losses: the reference halves D's loss to slow D relative to G."""
    return 0.5 * (lsgan_loss(discriminator(real), True) + lsgan_loss(discriminator(fake.detach()), False))


class ImagePool:
    """The history of generated images that D is shown (Shrivastava et al. 2017), as in CycleGAN's reference.

    While fewer than `size` are stored, each new image is stored and returned;
    then, with probability 1/2, a random stored image is returned and the new
    one takes its place, else the new one is returned. Showing D older fakes
    damps the oscillation between G and D. Draws come from the caller's
    generator, so the pool is deterministic and its contents are its state.
    """

    def __init__(self, size: int = 50):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image[None].clone()
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif torch.rand((), generator=generator) < 0.5:
                k = int(torch.randint(len(self.images), (), generator=generator))
                out.append(self.images[k])
                self.images[k] = image
            else:
                out.append(image)
        return torch.cat(out)

    def state(self) -> torch.Tensor | None:
        return torch.cat(self.images).cpu() if self.images else None

    def load(self, stored: torch.Tensor | None, device: torch.device | str) -> None:
        self.images = [] if stored is None else [x[None].to(device) for x in stored]


def lr_factor(step: int, steps: int) -> float:
    """Constant LR for the first half, then linear decay towards 0 (the reference's 'linear' policy per step)."""
    decay_start = steps // 2
    return 1.0 - max(0, step + 1 - decay_start) / float(steps - decay_start + 1)


# --------------------------------------------------------------------------- checkpoints
#
# One safetensors file (weights, Adam moments, image pools; the rest as JSON metadata) replaced atomically.
# The helpers of diffusion/checkpoint.py are folder-based and importing that module pulls in diffusers
# (~20 s on a small CPU box), so the few lines needed here are written out.

def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, step: int, model: CycleGAN, optimizers: dict[str, torch.optim.Optimizer],
                     pools: dict[str, ImagePool], identity: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    groups = {}
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        groups[name] = state["param_groups"]
        for pid, slots in state["state"].items():
            for slot, value in slots.items():
                tensors[f"{name}.{pid}.{slot}"] = value.detach().cpu().contiguous()
    for name, pool in pools.items():
        if (stored := pool.state()) is not None:
            tensors[f"pool.{name}"] = stored
    meta = {**identity, "step": step, "train_seconds": model.train_seconds, "param_groups": groups}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"state": json.dumps(meta)})


def _load_checkpoint(path: Path, model: CycleGAN, optimizers: dict[str, torch.optim.Optimizer],
                     pools: dict[str, ImagePool], identity: dict[str, Any]) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["state"])
    differs = sorted(k for k, v in identity.items() if meta.get(k) != v)
    if differs:
        raise ValueError(f"{path} was written by a training run with another {', '.join(differs)}; "
                         f"delete it to start afresh or use another output folder")
    tensors = load_file(path)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    device = next(model.parameters()).device
    for name, optimizer in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(f"{name}."):
                _, pid, slot = key.split(".", 2)
                state.setdefault(int(pid), {})[slot] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    for name, pool in pools.items():
        pool.load(tensors.get(f"pool.{name}"), device)
    model.train_seconds = float(meta["train_seconds"])
    return int(meta["step"])


# --------------------------------------------------------------------------- training

def _check_images(images: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (size, size) or len(images) == 0:
        raise ValueError(f"{name} must be a non-empty (N, 1, {size}, {size}) tensor in [-1, 1] (the config's "
                         f"image_size), got shape {tuple(images.shape)}")
    return images.float()


def train_cyclegan(images_a: torch.Tensor, images_b: torch.Tensor, config: CycleGANConfig, seed: int = 0,
                   out: str | Path | None = None, progress: bool = True, *,
                   device: str | torch.device = "cpu") -> CycleGAN:
    """Train one CycleGAN between two unpaired image sets (N, 1, S, S) in [-1, 1]; returns it in eval mode.

    With `out`, a checkpoint is written there every `config.checkpoint_every`
    steps and at the end, atomically; calling again with the same data, config
    and seed continues from it (after a kill) and reaches the same weights as
    an uninterrupted run. A checkpoint of another run is refused.
    """
    a = _check_images(images_a, config.image_size, "images_a")
    b = _check_images(images_b, config.image_size, "images_b")
    model = CycleGAN(config, seed).to(device)
    optimizers = {
        "opt_g": torch.optim.Adam(itertools.chain(model.g_ab.parameters(), model.g_ba.parameters()),
                                  lr=config.learning_rate, betas=(config.beta1, 0.999)),
        "opt_d": torch.optim.Adam(itertools.chain(model.d_a.parameters(), model.d_b.parameters()),
                                  lr=config.learning_rate, betas=(config.beta1, 0.999)),
    }
    pools = {"a": ImagePool(config.pool_size), "b": ImagePool(config.pool_size)}
    identity = {"config": asdict(config), "seed": seed, "data": _digest(a, b)}
    path = Path(out) / CHECKPOINT_FILE if out is not None else None
    start = 0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            start = _load_checkpoint(path, model, optimizers, pools, identity)

    model.train()
    tick = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc="cyclegan", unit="step", disable=not progress)
    for step in range(start, config.steps):
        g = torch.Generator().manual_seed(derive_seed(seed, step))
        real_a = a[torch.randint(len(a), (config.batch_size,), generator=g)].to(device)
        real_b = b[torch.randint(len(b), (config.batch_size,), generator=g)].to(device)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * lr_factor(step, config.steps)

        # Generators: adversarial + cycle-consistency + identity (eq. 3 of Zhu et al. with §5.2's identity term).
        model.d_a.requires_grad_(False)
        model.d_b.requires_grad_(False)
        fake_b, fake_a = model.g_ab(real_a), model.g_ba(real_b)
        loss_gan = lsgan_loss(model.d_b(fake_b), True) + lsgan_loss(model.d_a(fake_a), True)
        loss_cyc = F.l1_loss(model.g_ba(fake_b), real_a) + F.l1_loss(model.g_ab(fake_a), real_b)
        loss_id = F.l1_loss(model.g_ab(real_b), real_b) + F.l1_loss(model.g_ba(real_a), real_a)
        loss_g = loss_gan + config.lambda_cyc * loss_cyc + config.lambda_id * loss_id
        optimizers["opt_g"].zero_grad(set_to_none=True)
        loss_g.backward()
        optimizers["opt_g"].step()

        # Discriminators, on real images and on fakes drawn through the history pools.
        model.d_a.requires_grad_(True)
        model.d_b.requires_grad_(True)
        loss_d = (discriminator_loss(model.d_b, real_b, pools["b"].query(fake_b, g))
                  + discriminator_loss(model.d_a, real_a, pools["a"].query(fake_a, g)))
        optimizers["opt_d"].zero_grad(set_to_none=True)
        loss_d.backward()
        optimizers["opt_d"].step()

        bar.update(1)
        bar.set_postfix(gan=f"{loss_gan.item():.3f}", cyc=f"{loss_cyc.item():.3f}", d=f"{loss_d.item():.3f}")
        if path is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            model.train_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            _save_checkpoint(path, step + 1, model, optimizers, pools, identity)
    bar.close()
    if path is None:  # with a checkpoint, the time was added when the last one was written
        model.train_seconds += time.perf_counter() - tick
    return model.eval()
