"""Does the model copy its training images? Nearest neighbours, near-copy rates, Fréchet distance (notebook 03).

Privacy (§4.3.2, Fig. 2): a generated image must not be a training image. We
measure it as the memorisation literature does — the similarity of each
generated image to its nearest training image, and the share above a copy
threshold (Somepalli et al. 2023; Carlini et al. 2023; CPSample reports the
same "high-similarity rate"):

- similarity = normalised cross-correlation (NCC) of pixels, i.e. the cosine
  similarity of mean-centred, unit-norm images. Somepalli et al. and CPSample
  use cosine similarity of *embeddings* (SSCD, Inception); no pretrained copy
  detector can be downloaded here, and on 32–64 px grayscale B-mode images the
  pixels themselves are a faithful space: NCC is 1 for an exact copy whatever its
  gain and offset (brightness augmentation cannot hide a copy), ≈ 0 for noise.
  Carlini et al. use an L2 distance in pixel space; on standardised images it
  ranks as NCC does, ‖a − b‖² = 2(1 − NCC) for unit vectors.
- horizontal flips of the training images count as copies too (a model
  pretrained with the paper's flip augmentation learns both orientations).
- the copy threshold is calibrated on real data (`novelty_threshold`): the
  highest NCC any held-out real image reaches against the training set, so that
  no genuinely new image of the same population would be called a copy.

Realism is the Fréchet distance between real and generated features. No
Inception weights can be downloaded, so the feature space is a domain network:
the penultimate features of a probe (`probes.SmallCNN`) trained on real images,
plugged into torchmetrics' `FrechetInceptionDistance` as a custom `feature`
module.

`compare_arms` puts sampling arms side by side in these measures; the
deliberately memorising setting that uses it to measure CPSample is an
experiment (`busgen_lib/experiments/memorisation.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from busgen_lib.evaluate.probes import SmallCNN
from busgen_lib.evaluate.stats import proportion_ci


# --------------------------------------------------------------------------- nearest neighbours

def _standardise(images: torch.Tensor) -> torch.Tensor:
    """(N, ...) → (N, D) mean-centred unit vectors (a constant image becomes 0, similar to nothing)."""
    flat = images.reshape(len(images), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) normalised cross-correlation between every image of `a` (N, ...) and of `b` (M, ...)."""
    return _standardise(a) @ _standardise(b).T


@dataclass
class Neighbours:
    """Per generated image: NCC with its nearest training image, that image's index, and whether it
    matched the training image's horizontal mirror."""

    similarity: np.ndarray
    index: np.ndarray
    flipped: np.ndarray


def nearest_neighbours(generated: torch.Tensor, training: torch.Tensor, flips: bool = True,
                       batch_size: int = 512) -> Neighbours:
    """The nearest training image (max NCC) of each generated image; both (N, 1, S, S) of one size."""
    if generated.shape[1:] != training.shape[1:]:
        raise ValueError(f"generated images {tuple(generated.shape[1:])} and training images "
                         f"{tuple(training.shape[1:])} differ in shape; resize one set first")
    bank = torch.cat((training, training.flip(-1))) if flips else training
    bank = _standardise(bank)
    best, where = [], []
    for start in range(0, len(generated), batch_size):
        sims = _standardise(generated[start: start + batch_size]) @ bank.T
        value, index = sims.max(dim=1)
        best.append(value)
        where.append(index)
    index = torch.cat(where).numpy()
    return Neighbours(similarity=torch.cat(best).numpy(), index=index % len(training),
                      flipped=index >= len(training))


def novelty_threshold(training: torch.Tensor, holdout: torch.Tensor, flips: bool = True) -> float:
    """The copy threshold: the highest NCC a held-out real image reaches against the training images.

    Held-out images are new by construction, so an image is called a near copy
    only when it is closer to a training image than any of them gets. Hold out
    whole patients: other views of a training lesion are near copies in effect.
    """
    return float(nearest_neighbours(holdout, training, flips).similarity.max())


@dataclass
class CopyRate:
    """Near copies among n generated images, with the Wilson CI of the rate."""

    copies: int
    n: int
    rate: float
    ci: tuple[float, float]
    threshold: float
    mean_similarity: float


def near_copy_rate(generated: torch.Tensor, training: torch.Tensor, threshold: float,
                   flips: bool = True) -> CopyRate:
    """Share of generated images whose nearest-neighbour NCC exceeds `threshold` (e.g. `novelty_threshold`)."""
    similarity = nearest_neighbours(generated, training, flips).similarity
    copies = int((similarity > threshold).sum())
    rate, lo, hi = proportion_ci(copies, len(similarity))
    return CopyRate(copies, len(similarity), rate, (lo, hi), threshold, float(similarity.mean()))


# --------------------------------------------------------------------------- Fréchet distance

class ProbeFeatures(nn.Module):
    """The penultimate features of a `SmallCNN` (global mean ‖ max of its last block) as an FID feature map."""

    def __init__(self, network: SmallCNN):
        super().__init__()
        self.network = network.eval()
        self.num_features = network.head[-1].in_features  # read by torchmetrics instead of a dummy forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.network.features(images.float())
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


@torch.no_grad()
def frechet_distance(real: torch.Tensor, generated: torch.Tensor, feature_extractor: nn.Module,
                     batch_size: int = 256) -> float:
    """‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½) of `feature_extractor` outputs (torchmetrics' FID).

    The extractor maps a batch of images as given (e.g. (N, 1, S, S) in [-1, 1])
    to (N, F) features; give it a `num_features` attribute or it is probed with
    one dummy batch. Small sets make the covariances rank-deficient and the
    distance biased upward: compare arms of equal size, and against real vs real.
    """
    was_training = feature_extractor.training
    feature_extractor.eval()
    metric = FrechetInceptionDistance(feature=feature_extractor, normalize=True,
                                      input_img_size=tuple(real.shape[1:]))
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start: start + batch_size], real=is_real)
    value = float(metric.compute())
    feature_extractor.train(was_training)
    return value


def _arm_row(arm: str, images: torch.Tensor, training: torch.Tensor, threshold: float, features: nn.Module,
             seconds: float) -> dict[str, Any]:
    copies = near_copy_rate(images, training, threshold)
    return {"arm": arm, "n": copies.n, "near_copies": copies.copies, "near_copy_rate": copies.rate,
            "ci_lo": copies.ci[0], "ci_hi": copies.ci[1], "mean_nn_similarity": copies.mean_similarity,
            "frechet_distance": frechet_distance(training, images, features), "seconds": seconds}


def compare_arms(arms: Mapping[str, tuple[torch.Tensor, float]], training: torch.Tensor, holdout: torch.Tensor,
                 features: nn.Module, threshold: float | None = None) -> pd.DataFrame:
    """One row per arm (name → (images, seconds)): near copies with Wilson CI, mean NN similarity, Fréchet
    distance to the training images, seconds; plus a `real hold-out` reference row.

    The threshold defaults to `novelty_threshold(training, holdout)`, so the
    reference row has 0 near copies by construction; its similarity and Fréchet
    distance are what a model that generalises (draws new images of the same
    population) would show.
    """
    threshold = novelty_threshold(training, holdout) if threshold is None else threshold
    rows = [_arm_row(name, images, training, threshold, features, seconds) for name, (images, seconds) in arms.items()]
    rows.append(_arm_row("real hold-out", holdout, training, threshold, features, 0.0))
    table = pd.DataFrame(rows)
    table.attrs["threshold"] = threshold
    return table
