"""What BUS-DM and Baseline-CLIP share: input images, augmentation, the AdamW + cosine loop, and §4.4's protocol.

§4.4: "To select the hyperparameters, we adopted 5-fold cross-validation on
downstream training sets and repeated each experiment 5 times for robustness."
`cross_validate` does the first (folds grouped by patient, so no patient's
views sit on both sides) for either model's training function; the repeats
are the studies' seeds (`recipes.train_fn(select_dir=...)` trains every seed
with the cross-validated choice, `experiments.generalisation.score_arms` keeps
each seed's scores).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torchvision.transforms import v2
from tqdm.auto import tqdm

from busgen_lib.data.dataset import ClassBalancedSampler, load_images
from busgen_lib.downstream.tasks import Task
from busgen_lib.parallel import run_jobs
from busgen_lib.profiles import get_downstream


class Scorer(Protocol):
    def predict_proba(self, data: pd.DataFrame | torch.Tensor) -> np.ndarray: ...


# A trainer: (train rows, task, profile, seed, lr, epochs) -> a model with predict_proba.
Trainer = Callable[..., Scorer]


# --------------------------------------------------------------------------- inputs

def as_inputs(data: pd.DataFrame | torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, size, size) images in [-1, 1]: a manifest's rows through the data layer, or a tensor resized."""
    if isinstance(data, pd.DataFrame):
        return load_images(data, size)
    images = torch.as_tensor(data, dtype=torch.float32)
    if images.ndim == 3:
        images = images[:, None]
    if images.shape[-2:] != (size, size):
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return images


def classification_augment(size: int) -> v2.Transform:
    """Flip, small affine and crop, brightness/contrast: label-preserving changes of a lesion image."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])


def augment_batch(images: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    """Augment each image of a [-1, 1] batch on its own draw (v2 colour ops expect [0, 1], hence the shift)."""
    return torch.stack([transform((x + 1.0) / 2.0) for x in images]) * 2.0 - 1.0


# --------------------------------------------------------------------------- optimisation

def train_loop(parameters: Iterable[torch.nn.Parameter], batches: Callable[[int], Sequence[torch.Tensor]],
               loss_fn: Callable[[torch.Tensor], torch.Tensor], epochs: int, lr: float, weight_decay: float,
               progress: bool = False, desc: str = "train") -> list[float]:
    """AdamW with a per-step cosine decay over `epochs` passes; returns each epoch's mean loss.

    `batches(epoch)` gives the index batches of an epoch and `loss_fn(indices)` the
    loss of one, so the classifier and the contrastive CLIP loss share one loop.
    """
    parameters = [p for p in parameters if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    plan = [batches(epoch) for epoch in range(epochs)]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, sum(map(len, plan))))
    history = []
    for epoch_batches in tqdm(plan, disable=not progress, desc=desc, unit="epoch"):
        losses = []
        for index in epoch_batches:
            loss = loss_fn(index)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    return history


def balanced_batches(y: np.ndarray, batch_size: int, seed: int) -> Callable[[int], list[torch.Tensor]]:
    """An epoch of len(y) class-balanced draws (the data layer's sampler), cut into batches."""
    sampler = ClassBalancedSampler(y.tolist(), seed=seed)

    def epoch_batches(epoch: int) -> list[torch.Tensor]:
        sampler.set_epoch(epoch)
        return list(torch.tensor(list(sampler)).split(batch_size))

    return epoch_batches


# --------------------------------------------------------------------------- provenance

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_record(sources: Sequence[str | Path]) -> list[dict[str, str]]:
    """[{path, sha256}] of the training manifests, for a model folder's record."""
    return [{"path": str(Path(s).resolve()), "sha256": file_sha256(s)} for s in sources]


# --------------------------------------------------------------------------- §4.4 protocol

def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


@dataclass
class CVResult:
    best: dict[str, float]       # the chosen {"lr", "epochs"}
    table: pd.DataFrame          # one row per (lr, epochs, fold): validation AUC
    summary: pd.DataFrame        # one row per (lr, epochs): mean and sd of the fold AUCs


def cross_validate(trainer: Trainer, df: pd.DataFrame, task: Task, profile: str, seed: int = 0,
                   progress: bool = False, workers: int | None = None) -> CVResult:
    """Pick (lr, epochs) from the profile's grid by k-fold CV grouped by patient (§4.4); highest mean AUC wins.

    Folds come from sklearn's StratifiedGroupKFold on `patient_id`, so folds keep
    the class ratio and never split a patient's images. The grid x folds fits are
    independent: they run in `workers` processes (`parallel.run_jobs`).
    """
    settings = get_downstream(profile)
    rows, y = task.select(df)
    rows = rows.reset_index(drop=True)
    folds = StratifiedGroupKFold(n_splits=settings.cv_folds, shuffle=True, random_state=seed)
    splits = list(folds.split(np.zeros(len(y)), y, groups=rows["patient_id"].astype(str)))
    jobs = [(lr, epochs, fold) for lr in settings.lr_grid for epochs in settings.epochs_grid
            for fold in range(len(splits))]

    def fit_fold(job: tuple[float, int, int]) -> dict:
        lr, epochs, fold = job
        train_idx, val_idx = splits[fold]
        model = trainer(rows.iloc[train_idx], task, profile, seed=seed, lr=lr, epochs=epochs)
        record = {"lr": lr, "epochs": epochs, "fold": fold, "n_val": len(val_idx),
                  "auc": _auc(y[val_idx], model.predict_proba(rows.iloc[val_idx]))}
        if progress:
            print(f"cv lr={lr:g} epochs={epochs} fold {fold}: AUC {record['auc']:.3f}", flush=True)
        return record

    records = run_jobs(jobs, fit_fold, workers)
    table = pd.DataFrame(records)
    summary = (table.groupby(["lr", "epochs"])["auc"].agg(mean_auc="mean", sd_auc="std").reset_index()
               .sort_values(["mean_auc", "epochs", "lr"], ascending=[False, True, True], ignore_index=True))
    best = {"lr": float(summary["lr"].iloc[0]), "epochs": int(summary["epochs"].iloc[0])}
    return CVResult(best, table, summary)
