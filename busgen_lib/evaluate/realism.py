"""Realism and privacy of generated images in a real-data feature space (§2.2, Fig 2b–c; notebook 04).

Privacy, as the paper measures it (Fig 2b): the cosine similarity of deep
features between every generated image and its nearest training image; its
highest values are 0.896–0.939 there, and the closest pairs are shown (Fig 2c).
No pretrained network can be downloaded here, so the features are those of an
encoder trained in-project on real images (`memorisation.ProbeFeatures`, e.g.
`experiments.memorisation.domain_features`). The copy threshold is set as
`memorisation.novelty_threshold` sets it for pixels: the highest similarity any
held-out real image (other patients) reaches against the training images.
The structural check beside it is MS-SSIM with that nearest neighbour (the
paper's highest: 0.669).

Realism: improved precision and recall (Kynkäänniemi et al. 2019) and the
Fréchet distance (`memorisation.frechet_distance`) between real and generated
features, and a classifier two-sample test (Lopez-Paz & Oquab 2017): a CNN
learns to tell real from generated images under patient-disjoint
cross-validation, and its out-of-fold AUC (0.5 = indistinguishable) gets the
paper's bootstrap CI (`stats.auc_ci`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

from busgen_lib.errors import DataError
from busgen_lib.evaluate.memorisation import Neighbours, frechet_distance
from busgen_lib.evaluate.probes import train_classifier
from busgen_lib.evaluate.stats import auc_ci, proportion_ci

# MS-SSIM's scale weights (Wang, Simoncelli & Bovik 2003), finest scale first, and its Gaussian window: σ = 1.5,
# which torchmetrics turns into an 11-px window (it derives the size from σ).
WANG_BETAS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MSSSIM_SIGMA = 1.5
MSSSIM_WINDOW = 11

# --------------------------------------------------------------------------- deep-feature nearest neighbours

@torch.no_grad()
def embed(images: torch.Tensor, features: nn.Module, batch_size: int = 256) -> torch.Tensor:
    """(N, F) features of images (N, 1, S, S) in [-1, 1], the extractor in eval mode."""
    was_training = features.training
    features.eval()
    out = torch.cat([features(images[i: i + batch_size].float()) for i in range(0, len(images), batch_size)])
    features.train(was_training)
    return out.double()


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)


def feature_neighbours(generated: torch.Tensor, training: torch.Tensor, features: nn.Module, flips: bool = True,
                       batch_size: int = 512) -> Neighbours:
    """The nearest training image of each generated image by cosine similarity of `features` (Fig 2b).

    Plain cosine, as the paper (not mean-centred as pixel NCC is): with ReLU
    features it is high even for unrelated images, so judge it against the
    held-out real reference, never on its own. With `flips`, mirrored training
    images count too (the paper's flip augmentation teaches both orientations).
    """
    if generated.shape[1:] != training.shape[1:]:
        raise DataError(f"generated images {tuple(generated.shape[1:])} and training images "
                        f"{tuple(training.shape[1:])} differ in shape; load both at one size")
    bank = _unit(embed(torch.cat((training, training.flip(-1))) if flips else training, features))
    query = _unit(embed(generated, features))
    best, where = [], []
    for start in range(0, len(query), batch_size):
        value, index = (query[start: start + batch_size] @ bank.T).max(dim=1)
        best.append(value)
        where.append(index)
    index = torch.cat(where).numpy()
    return Neighbours(similarity=torch.cat(best).numpy(), index=index % len(training),
                      flipped=index >= len(training))


def feature_novelty_threshold(training: torch.Tensor, holdout: torch.Tensor, features: nn.Module,
                              flips: bool = True) -> float:
    """The copy threshold in feature space: the highest cosine similarity a held-out real image reaches
    against the training images (hold out whole patients; see `memorisation.novelty_threshold`)."""
    return float(feature_neighbours(holdout, training, features, flips).similarity.max())


def neighbour_images(training: torch.Tensor, neighbours: Neighbours) -> torch.Tensor:
    """The nearest training image of each query, mirrored where the mirror was the match."""
    chosen = training[torch.as_tensor(neighbours.index)]
    return torch.where(torch.as_tensor(neighbours.flipped)[:, None, None, None], chosen.flip(-1), chosen)


def closest_pairs(neighbours: Neighbours, k: int = 2) -> np.ndarray:
    """Indices of the `k` generated images most similar to a training image, most similar first (Fig 2c)."""
    return np.argsort(-neighbours.similarity, kind="stable")[:k]


# --------------------------------------------------------------------------- MS-SSIM

def msssim_betas(size: int) -> tuple[float, ...]:
    """The scale weights of MS-SSIM for `size`-px images: as many of Wang et al.'s five scales, finest first, as
    the image allows, renormalised to sum to 1 (so a score stays on the reference's scale).

    The reference (11-px window, 5 scales) needs ≥ 176 px in torchmetrics. We
    keep its window and drop coarse scales until torchmetrics' check passes and
    the coarsest scale is wider than the window's half: 2 scales at 32 px, 3 at
    44–98 px (64 px: 64, 32, 16), 4 at 99–175 px, 5 from 176 px.
    """
    def fits(m: int) -> bool:
        half = MSSSIM_WINDOW // 2
        return size // max(1, m - 1) ** 2 > MSSSIM_WINDOW - 1 and size / 2 ** (m - 1) > half

    scales = max((m for m in range(1, len(WANG_BETAS) + 1) if fits(m)), default=0)
    if scales == 0:
        raise DataError(f"MS-SSIM needs images of more than {MSSSIM_WINDOW - 1} px, got {size} px")
    kept = np.asarray(WANG_BETAS[:scales])
    return tuple(float(b) for b in kept / kept.sum())


@torch.no_grad()
def msssim(a: torch.Tensor, b: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Per-pair MS-SSIM of images (N, 1, S, S) in [-1, 1]: torchmetrics' (negative terms clipped at 0, its
    default), 11-px Gaussian window (σ 1.5), the scales of `msssim_betas`."""
    metric = MultiScaleStructuralSimilarityIndexMeasure(kernel_size=MSSSIM_WINDOW, sigma=MSSSIM_SIGMA,
                                                        betas=msssim_betas(a.shape[-1]), data_range=2.0,
                                                        reduction="none")
    return torch.cat([metric(a[i: i + batch_size].float(), b[i: i + batch_size].float())
                      for i in range(0, len(a), batch_size)]).numpy()


# --------------------------------------------------------------------------- precision and recall

def _radii(points: torch.Tensor, k: int, batch_size: int = 1024) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point of the same set (its manifold ball)."""
    if len(points) <= k:
        raise DataError(f"precision/recall with k = {k} needs more than {k} feature vectors per set, got {len(points)}")
    # k + 1: the point itself is at distance 0; in row blocks so that memory stays O(batch x N)
    return torch.cat([torch.cdist(points[i: i + batch_size], points).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(points), batch_size)])


def _coverage(balls: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch_size: int = 1024) -> float:
    """Share of queries inside at least one ball (centre, radius)."""
    inside = torch.cat([(torch.cdist(queries[i: i + batch_size], balls) <= radii[None]).any(dim=1)
                        for i in range(0, len(queries), batch_size)])
    return float(inside.double().mean())


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, their k = 3) of feature sets (N, F), (M, F).

    Each set's manifold is the union of balls around its points reaching their
    k-th nearest neighbour; precision is the share of generated points inside
    the real manifold (realism), recall the share of real points inside the
    generated one (diversity). Hand-written: neither torchmetrics nor another
    chosen dependency implements it; it is a few lines of `torch.cdist`.
    """
    real, generated = real.double(), generated.double()
    return _coverage(real, _radii(real, k), generated), _coverage(generated, _radii(generated, k), real)


# --------------------------------------------------------------------------- classifier two-sample test

def grouped_folds(labels: np.ndarray, groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of every row: stratified by label, and a group (patient) never split over two folds."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(np.unique(groups[labels == 0])) < folds or len(np.unique(groups[labels == 1])) < folds:
        raise DataError(f"{folds}-fold cross-validation needs at least {folds} patients (groups) per class; "
                        "lower folds or add images")
    out = np.empty(len(labels), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        out[test] = fold
    return out


@dataclass
class TwoSampleTest:
    """Out-of-fold P(generated) of every image, with the AUC and its bootstrap CI (0.5 = indistinguishable)."""

    auc: float
    ci: tuple[float, float]
    labels: np.ndarray   # 1 = generated
    scores: np.ndarray
    folds: np.ndarray


def two_sample_test(real: torch.Tensor, generated: torch.Tensor, real_groups: Sequence[str],
                    generated_groups: Sequence[str] | None = None, folds: int = 5, epochs: int = 20,
                    seed: int = 0, n_boot: int = 1000) -> TwoSampleTest:
    """Train a `probes.SmallCNN` to tell real (0) from generated (1) images, patient-disjoint `folds`-fold CV.

    Every image is scored by the network that did not see its patient, so the
    AUC measures what separates the two sets, not a memorised patient (views of
    one lesion are near duplicates). Each generated image is its own group
    unless `generated_groups` says otherwise.
    """
    images = torch.cat((real, generated)).float()
    labels = np.r_[np.zeros(len(real), dtype=int), np.ones(len(generated), dtype=int)]
    generated_groups = ([f"generated-{i}" for i in range(len(generated))] if generated_groups is None
                        else list(generated_groups))
    groups = np.array([f"real:{g}" for g in real_groups] + [f"generated:{g}" for g in generated_groups])
    fold_of = grouped_folds(labels, groups, folds, seed)
    scores = np.empty(len(labels))
    for fold in range(folds):
        train, test = fold_of != fold, fold_of == fold
        probe = train_classifier(images[train], torch.as_tensor(labels[train]), 2, epochs=epochs, seed=seed + fold,
                                 classes=("real", "generated"), progress=False)
        scores[test] = probe.predict_proba(images[test])[:, 1]
    auc, lo, hi = auc_ci(labels, scores, n_boot=n_boot, seed=seed)
    return TwoSampleTest(auc, (lo, hi), labels, scores, fold_of)


# --------------------------------------------------------------------------- one table

def _row(generated: torch.Tensor, training: torch.Tensor, features: nn.Module, threshold: float, found: Neighbours,
         ssim: np.ndarray, k: int) -> dict[str, Any]:
    copies = int((found.similarity > threshold).sum())
    rate, lo, hi = proportion_ci(copies, len(generated))
    precision, recall = precision_recall(embed(training, features), embed(generated, features), k)
    return {"n": len(generated), "max_cosine": float(found.similarity.max()),
            "median_cosine": float(np.median(found.similarity)), "copies": copies, "copy_rate": rate,
            "copy_ci_lo": lo, "copy_ci_hi": hi, "max_msssim": float(ssim.max()),
            "median_msssim": float(np.median(ssim)),
            "precision": precision, "recall": recall,
            "frechet_distance": frechet_distance(training, generated, features)}


@dataclass
class Realism:
    """Per arm: a table row, each image's nearest training neighbour and MS-SSIM with it; the copy threshold."""

    table: pd.DataFrame
    threshold: float
    neighbours: dict[str, Neighbours]
    msssim: dict[str, np.ndarray]


def measure_realism(arms: Mapping[str, torch.Tensor], training: torch.Tensor, holdout: torch.Tensor,
                    features: nn.Module, k: int = 3) -> Realism:
    """Privacy and realism of each arm (name → images) against the training images, plus a `real hold-out` row.

    Columns: highest and median cosine similarity to the nearest training image,
    copies above the threshold (`feature_novelty_threshold`) with a Wilson CI,
    highest and median MS-SSIM with that neighbour, precision and recall (k-NN
    manifolds) and Fréchet distance to the training features. The hold-out row
    (new real patients) is what a generator drawing genuinely new images of the
    population would score; it has 0 copies by construction.
    """
    threshold = feature_novelty_threshold(training, holdout, features)
    sets = {**arms, "real hold-out": holdout}
    neighbours = {name: feature_neighbours(images, training, features) for name, images in sets.items()}
    ssim = {name: msssim(images, neighbour_images(training, neighbours[name])) for name, images in sets.items()}
    rows = [{"arm": name, **_row(images, training, features, threshold, neighbours[name], ssim[name], k)}
            for name, images in sets.items()]
    return Realism(pd.DataFrame(rows), threshold, neighbours, ssim)
