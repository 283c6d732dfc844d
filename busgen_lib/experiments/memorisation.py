"""The deliberately memorising setting: does CPSample remove copies, and at what cost? (notebook 03)

A tiny model trained long on a few images memorises them; it is sampled with
and without CPSample (`diffusion/privacy.py`) from the same seeds, and the
arms are compared by `evaluate.memorisation.compare_arms` (near copies against
a real-data threshold, Fréchet distance in a real-data probe's features).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from busgen_lib.data.dataset import BUSDataset, load_images
from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.data.schema import PATHOLOGIES
from busgen_lib.diffusion import pipeline
from busgen_lib.diffusion.checkpoint import load_model
from busgen_lib.diffusion.model import BUSGenUNet
from busgen_lib.diffusion.privacy import (DEFAULT_ALPHA, DEFAULT_SCALE, CPSampleFit, CPSampleGuidance, random_labels,
                                          train_cpsample_classifier)
from busgen_lib.diffusion.sample import CondFn, sample
from busgen_lib.diffusion.schedule import ddpm_scheduler
from busgen_lib.diffusion.train import pretrain
from busgen_lib.evaluate.memorisation import ProbeFeatures, compare_arms
from busgen_lib.evaluate.probes import train_classifier


# The demo network's shape, for the smoke profile's 32 px: big enough to memorise 16 images in 2000 steps.
MEMORISING_MODEL = dict(block_out_channels=(16, 48, 96, 128), attention_levels=(False, False, True, True),
                        layers_per_block=1, norm_num_groups=16)

def memorisation_subset(manifest: str | Path, out: str | Path, n_train: int = 16, n_holdout: int = 8,
                        seed: int = 0) -> Path:
    """A manifest of `n_train` training images, one per lesion (or lesion-free exam), and `n_holdout`
    test images of *other* patients; returns its path (`out/manifest.csv`).

    One image per lesion so that the training set has no near-duplicate views;
    hold-out patients never share a lesion with the training set, so their NN
    similarity is that of genuinely new images (`novelty_threshold`).
    """
    df = read_manifest(manifest)
    rng = np.random.default_rng(seed)
    # Views of one lesion (or of one lesion-free exam) are near-duplicates: keep the first of each.
    key = df["lesion_id"].where(df["lesion_id"].astype(str).str.len() > 0, df["exam_id"])
    firsts = df.loc[~key.duplicated()]
    patients = list(firsts["patient_id"].unique())
    patients = [patients[i] for i in rng.permutation(len(patients))]
    chosen_train, used = [], set()
    for patient in patients:
        if len(chosen_train) >= n_train:
            break
        rows = firsts.index[firsts["patient_id"] == patient].tolist()
        chosen_train += rows[: n_train - len(chosen_train)]
        used.add(patient)
    if len(chosen_train) < n_train:
        raise ValueError(f"{manifest}: only {len(chosen_train)} distinct lesions, asked for {n_train}")
    rest = firsts.loc[~firsts["patient_id"].isin(used)]
    if len(rest) < n_holdout:
        raise ValueError(f"{manifest}: {len(rest)} lesions of unused patients, asked for {n_holdout} to hold out")
    chosen_holdout = rng.choice(rest.index.to_numpy(), n_holdout, replace=False).tolist()
    subset = pd.concat([df.loc[chosen_train].assign(split="train"), df.loc[chosen_holdout].assign(split="test")])
    subset.attrs = df.attrs
    return write_manifest(subset, Path(out) / "manifest.csv")


def domain_features(manifest: str | Path, size: int, epochs: int = 20, seed: int = 0) -> ProbeFeatures:
    """A Fréchet feature space from real data: a SmallCNN trained to tell the pathology of every image of
    `manifest` (all splits), its penultimate layer."""
    df = read_manifest(manifest)
    labels = torch.tensor([PATHOLOGIES.index(p) for p in df["pathology"]])
    probe = train_classifier(load_images(df, size), labels, len(PATHOLOGIES), epochs=epochs, seed=seed,
                             progress=False)
    return ProbeFeatures(probe.model)


def training_conditions(train_df: pd.DataFrame, model: BUSGenUNet, n: int) -> dict[str, torch.Tensor]:
    """The conditions of the training rows, cycled to n: asking for a training image's own pathology,
    device and boxes is the setting most likely to reproduce it."""
    dataset = BUSDataset(train_df, image_size=model.config.image_size, device_vocab=model.config.device_names,
                         max_boxes=model.config.max_boxes)
    rows = [dataset[i % len(dataset)] for i in range(n)]
    return {k: torch.stack([r[k] for r in rows]) for k in ("pathology", "device", "boxes", "box_valid", "box_mask")}


def classifier_training_set(train_df: pd.DataFrame, size: int, views: int = 1, seed: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images plus `views − 1` augmented copies each (the pretraining pipeline's
    augmentation), with one random bit per image shared by all its views."""
    images = [load_images(train_df, size)]
    augmented = BUSDataset(train_df, image_size=size, train=True, seed=seed)
    for epoch in range(1, views):
        augmented.set_epoch(epoch)
        images.append(torch.stack([augmented[i]["image"] for i in range(len(augmented))]))
    return torch.cat(images), random_labels(len(train_df), seed).repeat(views)


def sample_conditions(model: BUSGenUNet, cond: Mapping[str, torch.Tensor], cond_fn: CondFn | None,
                  batch_size: int = 32, **settings: Any) -> torch.Tensor:
    """`sample` in batches of `batch_size`; pass `seeds` (one per row) so that batching cannot change a sample."""
    seeds: Sequence[int] = settings.pop("seeds")
    parts = []
    for start in range(0, len(seeds), batch_size):
        part = {k: v[start: start + batch_size] for k, v in cond.items()}
        parts.append(sample(model, part, seeds=seeds[start: start + batch_size], cond_fn=cond_fn, progress=False,
                            **settings).detach())
    return torch.cat(parts)


def memorisation_study(manifest: str | Path, profile: str, out: str | Path, *, n_train: int = 16,
                       n_holdout: int = 8, n_generate: int = 32, train_steps: int = 2000,
                       train_overrides: Mapping[str, Any] | None = None,
                       model_overrides: Mapping[str, Any] | None = None, classifier_steps: int = 2000,
                       classifier_views: int = 1,
                       cpsample: Sequence[tuple[float, float]] = ((DEFAULT_ALPHA, DEFAULT_SCALE),),
                       sample_steps: int | None = None, guidance: float | None = None,
                       threshold: float | None = None, feature_epochs: int = 20, seed: int = 0,
                       progress: bool = True) -> tuple[pd.DataFrame, CPSampleFit]:
    """Train a model to memorise a few images, sample it with and without CPSample; one table row per arm.

    Steps: `memorisation_subset` → `pretrain` (`train_steps` on `n_train` images;
    the profile's other settings unless overridden) → CPSample classifier on the
    same images (`classifier_training_set`) → `n_generate` images per arm — plain,
    then one per (α, s) in `cpsample` — with the training images' own conditions
    and the same seeds → `compare_arms` in the features of `domain_features`.
    A finished model in `out/run` is reused, so a second call only re-samples.
    Returns the table (with the share of sample-steps CPSample pushed) and the classifier fit (its
    accuracies say how well it memorised).

    The smoke network is too small to memorise 16 phantom images in 2000 steps
    (its samples stay further from them than new real images are); the demo
    network's shape at 32 px does memorise them: pass
    `model_overrides=MEMORISING_MODEL` with the smoke profile. Notebook 03 holds
    the measured copy rates.
    """
    out = Path(out)
    subset = memorisation_subset(manifest, out, n_train, n_holdout, seed)
    model_dir = out / "run" / "model"
    if not (model_dir / "config.json").exists():
        pretrain(subset, profile, out / "run", resume=True,
                 train_overrides={"steps": train_steps, "seed": seed, **(train_overrides or {})},
                 model_overrides=dict(model_overrides or {}), progress=progress)
    model = load_model(model_dir)
    size = model.config.image_size
    df = read_manifest(subset)
    train_df = df[df["split"] == "train"]
    training, holdout = load_images(train_df, size), load_images(df[df["split"] == "test"], size)

    images, labels = classifier_training_set(train_df, size, classifier_views, seed)
    fit = train_cpsample_classifier(images, model.config, labels=labels, steps=classifier_steps, seed=seed,
                                    progress=progress)
    alphas_cumprod = ddpm_scheduler(model.config).alphas_cumprod
    settings = pipeline.sampling_options(model, steps=sample_steps, guidance=guidance) | {
        "seeds": [seed * 100_003 + i for i in range(n_generate)]}
    cond = training_conditions(train_df, model, n_generate)
    hooks = {"plain": None} | {f"CPSample α={a:g} s={s:g}": CPSampleGuidance(fit.classifier, alphas_cumprod,
                                                                             alpha=a, scale=s) for a, s in cpsample}
    arms = {}
    for name, cond_fn in hooks.items():
        start = time.perf_counter()
        arms[name] = (sample_conditions(model, cond, cond_fn, **settings), time.perf_counter() - start)
    features = domain_features(manifest, size, epochs=feature_epochs, seed=seed)
    table = compare_arms(arms, training, holdout, features, threshold)
    table["cpsample_fire_rate"] = [hooks[a].fire_rate if hooks.get(a) else float("nan") for a in table["arm"]]
    return table, fit
