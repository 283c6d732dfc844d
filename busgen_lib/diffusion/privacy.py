"""CPSample privacy guidance (§4.3.2; Kazdan et al., 2024, BUSGen ref. 57).

CPSample keeps a diffusion model from reproducing its training images without
retraining it. A small *noise-aware* classifier f_φ(x_t, t) → p is trained to
overfit one fixed random bit per training image, on noised copies
x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε over the diffusion model's own schedule. Random
labels carry no structure, so the classifier can only be certain near the images
it memorised; everywhere else it stays near p = ½. While sampling, a sample that
the classifier classifies with high certainty, min(p, 1 − p) < α, is pushed back
toward p = ½ by classifier guidance of strength s.

The guidance, in ε-space (Dhariwal & Nichol 2021: guidance toward a target y is
ε̂ = ε − s √(1 − ᾱ_t) ∇_{x_t} log p(y | x_t)), with "maximal uncertainty" as the
target, i.e. the objective log p + log(1 − p) = log(p(1 − p)), which peaks at p = ½:

    ε̂ = ε − s · √(1 − ᾱ_t) · ∇_{x_t} log(p(1 − p))     if min(p, 1 − p) < α,
    ε̂ = ε                                              otherwise (exactly).

Sign: with logit z, ∇ log(p(1 − p)) = (1 − 2p) ∇z. Every solver turns ε̂ into
x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t, so the push moves x̂_0 by
+s (1 − ᾱ_t)/√ᾱ_t · (1 − 2p) ∇z: up the logit where p < ½, down where p > ½ —
toward ½ on both sides (tests/test_privacy.py checks it on an analytic classifier).
The objective equals −2 × the binary cross-entropy to the target ½, so a
formulation "descend the BCE to ½" is the same push with s halved.

Provenance: the paper's abstract, its Fig. 1 setting (α = 0.001, s = 1000 with
DDIM on CIFAR-10) and its α grid (0.5, 0.25, 0.001) were checked in stored copies;
the method section and the authors' code were not reachable from here, so the
exact objective above is our derivation of "classifier guidance toward ½" and
may differ from theirs by a constant factor in s.

α and s depend on the classifier: α must lie above the certainty it reaches on
its training images, and s is in units of its logit gradients. On a memorising
32 px phantom model (notebook 03, `evaluate/memorisation.py`; 16 images, 32
samples per arm) the paper's α = 1e-3, s = 1000 removed 3 of 18 near copies in
one run, half of 16 in another and 15 of 18 in a third, the last two at a large
realism cost (Fréchet distance 287 → 7,693; 296 → 9,097); α = 0.01, s = 100
removed 10 of 18 (Fréchet 799 → 834), 4 of 16 (287 → 1,384) and 18 of 18
(296 → 3,472, a model trained with offset noise). Our defaults are the milder
setting; measure the trade-off on your own data.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import CONFIG_NAME
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from tqdm.auto import tqdm

from busgen_lib.diffusion.checkpoint import atomic_folder, load_pretrained
from busgen_lib.diffusion.schedule import ScheduleConfig, ddpm_scheduler, q_sample
from busgen_lib.diffusion.train import weights_digest
from busgen_lib.errors import DataError, UsageError

ARCHITECTURE = "cpsample-classifier-v1"
# The CPSample paper's Fig. 1 setting is α = 1e-3, s = 1000; on our memorising phantom model the milder
# α = 0.01, s = 100 cost less realism (module docstring).
DEFAULT_ALPHA = 0.01
DEFAULT_SCALE = 100.0
PROTECT_FILE = "protect.json"  # what a saved classifier was trained for (protected-set fingerprint, steps, seed)


# --------------------------------------------------------------------------- the classifier

class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    """f_φ(x_t, t) → logit of "label 1": diffusers ResNet blocks with a timestep embedding.

    The timestep embedding (sinusoidal + MLP, as in the UNet) enters every block,
    so one network can be certain about a memorised image at small t and know
    that nothing can be told apart at large t. Blocks halve the resolution
    between levels; the flattened last feature map feeds one linear logit. Not a
    global mean, as in recognition nets: memorising a bit per image needs *where*
    things are, which a mean averages away (16 noise images, 300 steps: train
    accuracy 0.5 with a mean head, 1.0 with a flat one).

    A diffusers model like the UNet: its arguments (shape, and the diffusion
    schedule it was trained on) are its `config`, saved by `save_pretrained`.
    """

    @register_to_config
    def __init__(self, image_size: int, num_train_timesteps: int, beta_start: float, beta_end: float,
                 widths: Sequence[int] = (32, 64, 64), norm_num_groups: int = 8, architecture: str = ARCHITECTURE):
        super().__init__()
        if architecture != ARCHITECTURE:
            raise ValueError(f"not a CPSample classifier: architecture {architecture!r}, expected {ARCHITECTURE!r}")
        base, groups = widths[0], norm_num_groups
        temb = 4 * base
        self.time_proj = Timesteps(base, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base, temb)
        self.conv_in = nn.Conv2d(1, base, 3, padding=1)
        widths_in = (base, *widths[:-1])
        self.blocks = nn.ModuleList(ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb,
                                                  groups=groups) for cin, cout in zip(widths_in, widths))
        self.norm_out = nn.GroupNorm(groups, widths[-1])
        side = image_size // 2 ** (len(widths) - 1)
        self.head = nn.Linear(widths[-1] * side * side, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """(B,) logits for images x_t (B, 1, S, S) at timesteps t (scalar or (B,))."""
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        h = self.conv_in(x_t)
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        return self.head(F.silu(self.norm_out(h)).flatten(1))[:, 0]


def classifier_config(schedule: ScheduleConfig, image_size: int, widths: tuple[int, ...] = (32, 64, 64),
                      norm_num_groups: int = 8) -> dict[str, Any]:
    """The `NoiseAwareClassifier` arguments on a diffusion model's schedule (pass `model.config`)."""
    return dict(image_size=image_size, num_train_timesteps=schedule.num_train_timesteps,
                beta_start=schedule.beta_start, beta_end=schedule.beta_end, widths=tuple(widths),
                norm_num_groups=norm_num_groups)


# --------------------------------------------------------------------------- training

def random_labels(n: int, seed: int = 0) -> torch.Tensor:
    """One fixed random bit per training image, exactly half ones (the larger half for odd n is zeros).

    Balanced rather than i.i.d. Bernoulli(½): with a majority label a classifier
    could look "certain" everywhere by predicting it, and the guidance would then
    push every sample, memorised or not.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (order < n // 2).to(torch.int64)


@dataclass
class CPSampleFit:
    """A trained CPSample classifier, its labels, and how well it memorised them."""

    classifier: NoiseAwareClassifier
    labels: torch.Tensor
    clean_accuracy: float   # on the training images at t = 0
    noised_accuracy: float  # on noised training images, t uniform over the schedule
    seconds: float


@torch.no_grad()
def classifier_accuracy(classifier: NoiseAwareClassifier, images: torch.Tensor, labels: torch.Tensor,
                        noised: bool = False, draws: int = 4, seed: int = 0, batch_size: int = 256) -> float:
    """Share of correct labels at t = 0, or (`noised`) over `draws` seeded draws of t ~ U{0..T−1} and ε each."""
    was_training = classifier.training
    classifier.eval()
    scheduler = ddpm_scheduler(classifier.config)
    generator = torch.Generator().manual_seed(seed)
    correct, total = 0, 0
    for _ in range(draws if noised else 1):
        for start in range(0, len(images), batch_size):
            x0, y = images[start: start + batch_size].float(), labels[start: start + batch_size]
            t = torch.zeros(len(x0), dtype=torch.int64)
            if noised:
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
                x0 = q_sample(scheduler, x0, t, torch.randn(x0.shape, generator=generator))
            correct += int(((classifier(x0, t) > 0).long() == y).sum())
            total += len(x0)
    classifier.train(was_training)
    return correct / total


def train_cpsample_classifier(images: torch.Tensor, schedule: ScheduleConfig, *,
                              labels: torch.Tensor | None = None, steps: int = 2000, batch_size: int = 32,
                              learning_rate: float = 2e-3, widths: tuple[int, ...] = (32, 64, 64),
                              flip: bool = False, seed: int = 0, progress: bool = True) -> CPSampleFit:
    """Overfit f_φ(x_t, t) to random labels of `images` (N, 1, S, S) in [-1, 1], noised on `schedule`.

    `schedule` is the diffusion model's (`model.config`), so that the classifier
    knows the noise levels the sampler will show it. Each step draws a batch,
    t ~ U{0..T−1} and ε, and descends the binary cross-entropy on x_t. `labels`
    default to `random_labels(N, seed)`; pass them yourself when `images` holds
    several augmented views per training image (one label per image, repeated
    over its views). `flip` adds horizontal flips, for models pretrained with
    flips (the paper's strong augmentation; our default pretraining keeps
    orientation, `data/augment.py`). Deterministic per seed (init, batches, t, ε, flips) on CPU.
    """
    images = images.float()
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, S, S) in [-1, 1], got shape {tuple(images.shape)}")
    labels = random_labels(len(images), seed) if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    start = time.perf_counter()
    torch.manual_seed(seed)
    classifier = NoiseAwareClassifier(**classifier_config(schedule, images.shape[-1], widths))
    scheduler = ddpm_scheduler(schedule)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    classifier.train()
    for _ in (bar := tqdm(range(steps), desc="CPSample classifier", disable=not progress)):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0, y = images[index], labels[index].float()
        if flip:
            x0 = torch.where(torch.rand(batch_size, 1, 1, 1, generator=generator) < 0.5, x0.flip(-1), x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        x_t = q_sample(scheduler, x0, t, torch.randn(x0.shape, generator=generator))
        loss = F.binary_cross_entropy_with_logits(classifier(x_t, t), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    classifier.eval()
    return CPSampleFit(classifier, labels,
                       clean_accuracy=classifier_accuracy(classifier, images, labels),
                       noised_accuracy=classifier_accuracy(classifier, images, labels, noised=True, seed=seed),
                       seconds=time.perf_counter() - start)


def protected_set_fingerprint(images: torch.Tensor) -> str:
    """SHA-256 of the protected images as the classifier sees them (float32 pixels and shape)."""
    pixels = images.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(pixels.shape)).encode())
    h.update(pixels.numpy().tobytes())
    return h.hexdigest()


def protect(images: torch.Tensor, schedule: ScheduleConfig, folder: str | Path, *, steps: int = 2000,
            seed: int = 0, progress: bool = True, source: str | Path = "") -> CPSampleFit:
    """The CPSample classifier of a training set: trained and saved to `folder`, or reloaded from it.

    The folder records what the classifier was trained for (`protect.json`: a
    fingerprint of the protected images, their count, the steps and the seed;
    `source` names the manifest, for the reader). A folder trained for other
    images, steps, seed, size or schedule is refused with the difference named:
    its accuracies would describe another set. A reloaded classifier has its
    accuracies measured again; `seconds` is 0.
    """
    folder = Path(folder)
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}: an untrained classifier protects nothing")
    if len(images) == 0:
        raise DataError(f"{source or 'protect'}: no training images to protect")
    record = {"images": protected_set_fingerprint(images), "n_images": len(images), "steps": steps, "seed": seed}
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: --out must be a folder, but a file of that name exists")
    if (folder / CONFIG_NAME).exists():
        classifier = load_classifier(folder)
        _check_same_training(folder, classifier, record, images.shape[-1], schedule)
        labels = random_labels(len(images), seed)
        return CPSampleFit(classifier, labels, classifier_accuracy(classifier, images.float(), labels),
                           classifier_accuracy(classifier, images.float(), labels, noised=True, seed=seed), 0.0)
    fit = train_cpsample_classifier(images, schedule, steps=steps, seed=seed, progress=progress)
    save_classifier(fit.classifier, folder, record={**record, "source": str(source)})
    return fit


def _check_same_training(folder: Path, classifier: NoiseAwareClassifier, record: dict, size: int,
                         schedule: ScheduleConfig) -> None:
    """Refuse a stored classifier trained for another set, steps, seed, resolution or schedule, naming each."""
    advice = "delete the folder (or choose another --out) to train one for these images"
    if (classifier.config.image_size, classifier.config.num_train_timesteps) != (size, schedule.num_train_timesteps):
        raise DataError(f"{folder}: classifier for {classifier.config.image_size} px and T = "
                        f"{classifier.config.num_train_timesteps}, not {size} px and T = "
                        f"{schedule.num_train_timesteps}; {advice}")
    path = folder / PROTECT_FILE
    if not path.exists():
        raise DataError(f"{folder}: no {PROTECT_FILE}, so what it was trained on is unknown; {advice}")
    stored = json.loads(path.read_text())
    names = {"images": "protected images", "n_images": "number of images", "steps": "--steps", "seed": "--seed"}
    diffs = [f"{names[k]} (stored {_short(stored.get(k))}, given {_short(v)})"
             for k, v in record.items() if stored.get(k) != v]
    if diffs:
        where = f" (trained on {stored['source']})" if stored.get("source") else ""
        raise DataError(f"{folder}: classifier was trained for other {', '.join(d.split(' (')[0] for d in diffs)}"
                        f"{where}: {'; '.join(diffs)}; {advice}")


def _short(value: object) -> str:
    """Fingerprints cut to 12 characters in messages."""
    return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else repr(value)


# --------------------------------------------------------------------------- guidance

def _alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, batch: int) -> torch.Tensor:
    """ᾱ_t per sample (B,) for a scalar or per-sample integer timestep (diffusers' solvers give ints)."""
    index = torch.as_tensor(t).to(device=alphas_cumprod.device, dtype=torch.int64).reshape(-1)
    return alphas_cumprod[index].expand(batch)


class CPSampleGuidance:
    """The CPSample push as a `sample(..., cond_fn=...)` hook: returns Δε, which the sampler adds to ε.

    Δε = −s √(1 − ᾱ_t) ∇_{x_t} log(p(1 − p)) for samples with min(p, 1 − p) < α,
    exactly 0 for the others (see the module docstring for the derivation and
    sign). `alphas_cumprod` is the diffusion model's ᾱ (T,), e.g.
    `ddpm_scheduler(model.config).alphas_cumprod`; it must be the schedule the
    classifier was trained on. Only x_t is differentiated; the classifier's
    weights get no gradients. `evaluated` and `fired` count sample-steps seen
    and pushed, so a run can report how often the protection acted.
    """

    def __init__(self, classifier: NoiseAwareClassifier, alphas_cumprod: torch.Tensor, *,
                 alpha: float = DEFAULT_ALPHA, scale: float = DEFAULT_SCALE):
        if len(alphas_cumprod) != classifier.config.num_train_timesteps:
            raise ValueError(f"the classifier was trained on T = {classifier.config.num_train_timesteps} steps, "
                             f"the sampler's schedule has {len(alphas_cumprod)}; train it on model.config")
        if not 0.0 < alpha <= 0.5:
            raise UsageError(f"--cpsample-alpha is a probability threshold in (0, 0.5], got {alpha}")
        if not math.isfinite(scale) or scale < 0:
            raise UsageError(f"--cpsample-scale must be a finite number >= 0, got {scale}")
        self.classifier = classifier.eval()
        self.alphas_cumprod = alphas_cumprod.detach().double()
        self.alpha, self.scale = alpha, scale
        self.evaluated = self.fired = 0

    def settings(self) -> dict:
        """What this guidance contributes to an image (recorded by the sampling folder): classifier, α, s."""
        return {"cpsample_classifier": weights_digest(self.classifier), "alpha": self.alpha, "scale": self.scale}

    @property
    def fire_rate(self) -> float:
        """Share of sample-steps on which the push acted."""
        return self.fired / max(1, self.evaluated)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        self.classifier.to(x_t.device)
        x = x_t.detach().float()
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        with torch.no_grad():
            p = torch.sigmoid(self.classifier(x, t))
        confident = torch.minimum(p, 1.0 - p) < self.alpha
        self.evaluated += len(confident)
        self.fired += int(confident.sum())
        delta = torch.zeros_like(x)
        if confident.any():  # the gradient only where the push acts: most steps of a non-copying sampler need none
            with torch.enable_grad():
                x_in = x[confident].requires_grad_(True)
                logit = self.classifier(x_in, t[confident])
                # log p + log(1 − p) via logsigmoid: exact even where p rounds to 0 or 1 in float32.
                objective = F.logsigmoid(logit) + F.logsigmoid(-logit)
                (grad,) = torch.autograd.grad(objective.sum(), x_in)
            abar = _alpha_bar_at(self.alphas_cumprod.to(x.device), t[confident], len(x_in))
            delta[confident] = -self.scale * torch.sqrt(1.0 - abar).to(grad.dtype)[:, None, None, None] * grad
        return delta.to(eps.dtype)


# --------------------------------------------------------------------------- files

def save_classifier(classifier: NoiseAwareClassifier, out: str | Path, record: dict | None = None) -> Path:
    """`save_pretrained` into `out` atomically, with `protect.json` (what it was trained for) when given."""
    with atomic_folder(out) as tmp:
        classifier.save_pretrained(tmp)
        if record is not None:
            (tmp / PROTECT_FILE).write_text(json.dumps(record, indent=1))
    return Path(out)


def load_classifier(folder: str | Path, map_location: str = "cpu") -> NoiseAwareClassifier:
    """`NoiseAwareClassifier.from_pretrained`, in eval mode, with a DataError naming a folder that is not one."""
    classifier = load_pretrained(NoiseAwareClassifier, folder, "a CPSample classifier folder (from `protect`)",
                                 "delete the folder to train the classifier again")
    return classifier.to(map_location).eval()
