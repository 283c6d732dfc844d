"""Data utility: does a classifier trained on a dataset (real, generated, cleaned) diagnose real images?

The paper's measure of generated data (§4.4, Fig 2): train the same diagnostic
model on each training set and compare AUCs on one real test set (§4.5). The
model here is the small real-data CNN of `probes` — the point is the comparison
between training sets under one fixed recipe, not a state-of-the-art classifier.

Each arm is trained with the same several seeds, because one trained model per
arm lets a test cover only test-set noise, while a small model's AUC moves from
seed to seed as much as between training sets; `stats.compare_seeded_arms`
reports mean and spread over seeds and tests across them. `random_removal` is
the control arm for cleaning: as many generated images removed, per class, as
the cleaning removed, but at random, so that "cleaning helps" means the judge's
choice helps, not merely fewer images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from busgen_lib.errors import DataError, UsageError
from busgen_lib.data.dataset import load_images
from busgen_lib.evaluate.probes import train_classifier
from busgen_lib.evaluate.stats import compare_seeded_arms


@dataclass
class DownstreamResult:
    """One table row per training set, and the per-seed test scores behind it (for ROC curves and further tests)."""

    table: pd.DataFrame
    y_true: np.ndarray
    scores: dict[str, list[np.ndarray]]
    seeds: tuple[int, ...]

    def aucs(self) -> dict[str, np.ndarray]:
        """Per arm, the AUC of each seed's classifier (the dots of `plotting.seeded_aucs`)."""
        return {name: np.array([roc_auc_score(self.y_true, s) for s in scores]) for name, scores in self.scores.items()}


def binary_task(df: pd.DataFrame, negative: str, positive: str, column: str = "pathology",
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows labelled `negative` or `positive` in `column`, and their 0/1 labels."""
    values = df[column].astype(str)
    rows = df[values.isin([negative, positive])]
    rows.attrs = dict(df.attrs)
    return rows, (rows[column].astype(str) == positive).to_numpy().astype(np.int64)


def downstream_auc(train_sets: Mapping[str, pd.DataFrame], test_df: pd.DataFrame, *, seeds: Sequence[int],
                   size: int = 32, negative: str = "benign", positive: str = "malignant", column: str = "pathology",
                   epochs: int = 20, reference: str | None = None, progress: bool = False) -> DownstreamResult:
    """Train one classifier per training set (name → manifest rows) and seed, and score it on the real `test_df`.

    Every arm gets the same architecture, epochs, augmentation and `seeds` (at
    least 2; seed k of one arm pairs with seed k of another). The table is
    `stats.compare_seeded_arms` against `reference` (default: the first arm) —
    per-seed AUC mean, SD, min, max; mean difference with its t CI, paired t and
    Wilcoxon p across seeds; DeLong p of the seed-averaged scores — plus
    `n_train` and `n_positive` per arm.
    """
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UsageError(f"downstream_auc needs at least 2 distinct seeds to test across training runs, got {seeds}")
    test_rows, y_true = binary_task(test_df, negative, positive, column)
    if y_true.min(initial=1) == y_true.max(initial=0):
        raise DataError(f"the test set needs both {negative!r} and {positive!r} rows in {column!r}")
    test_images = load_images(test_rows, size)
    scores, sizes = {}, {}
    for name, df in train_sets.items():
        train_rows, labels = binary_task(df, negative, positive, column)
        if labels.sum() in (0, len(labels)):
            raise DataError(f"training set {name!r} needs both {negative!r} and {positive!r} rows in {column!r}")
        images = load_images(train_rows, size)
        scores[name] = [train_classifier(images, torch.from_numpy(labels), 2, epochs, seed,
                                         classes=(negative, positive), progress=progress)
                        .predict_proba(test_images)[:, 1] for seed in seeds]
        sizes[name] = {"n_train": len(labels), "n_positive": int(labels.sum())}
    table = compare_seeded_arms(y_true, scores, reference=reference)
    table.insert(1, "n_train", table["arm"].map(lambda a: sizes[a]["n_train"]))
    table.insert(2, "n_positive", table["arm"].map(lambda a: sizes[a]["n_positive"]))
    return DownstreamResult(table, y_true, scores, tuple(seeds))


def random_removal(generated: pd.DataFrame, kept: pd.DataFrame, column: str = "pathology",
                   seed: int = 0) -> pd.DataFrame:
    """The control arm for cleaning: `generated` with as many rows removed at random, per class of `column`,
    as cleaning removed (its `kept` rows are a subset of `generated`).

    Same class counts as the cleaned set, different choice of images: a
    downstream gain of cleaning over this arm is the judge's doing.
    """
    have = generated[column].astype(str).value_counts()
    keep = kept[column].astype(str).value_counts().reindex(have.index, fill_value=0)
    extra = sorted(set(kept[column].astype(str)) - set(have.index))
    if extra or (keep > have).any():
        raise DataError(f"the kept rows are not a subset of the generated ones (classes {extra or list(have.index)} "
                        f"kept {keep.to_dict()} of {have.to_dict()}): pass the manifest the cleaning started from")
    rng = np.random.default_rng(seed)
    labels = generated[column].astype(str).to_numpy()
    chosen = np.zeros(len(generated), dtype=bool)
    for value, n in keep.items():
        chosen[rng.choice(np.flatnonzero(labels == value), size=int(n), replace=False)] = True
    rows = generated[chosen]
    rows.attrs = dict(generated.attrs)
    return rows
