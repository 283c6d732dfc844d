"""Data utility: does a classifier trained on a dataset (real, generated, cleaned) diagnose real images?

The paper's measure of generated data (§4.4, Fig 2): train the same diagnostic
model on each training set and compare AUCs on one real test set, with
DeLong CIs and DeLong's paired test (§4.5). The model here is the small
real-data CNN of `probes` — the point is the comparison between training sets
under one fixed recipe, not a state-of-the-art classifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from busgen_lib.evaluate.control import load_images
from busgen_lib.evaluate.probes import train_classifier
from busgen_lib.evaluate.stats import delong_ci, delong_test


@dataclass
class DownstreamResult:
    """One table row per training set, and the test scores behind it (for ROC curves and further tests)."""

    table: pd.DataFrame
    y_true: np.ndarray
    scores: dict[str, np.ndarray]


def binary_task(df: pd.DataFrame, negative: str, positive: str, column: str = "pathology",
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows labelled `negative` or `positive` in `column`, and their 0/1 labels."""
    values = df[column].astype(str)
    rows = df[values.isin([negative, positive])]
    rows.attrs = dict(df.attrs)
    return rows, (rows[column].astype(str) == positive).to_numpy().astype(np.int64)


def downstream_auc(train_sets: Mapping[str, pd.DataFrame], test_df: pd.DataFrame, *, size: int = 32,
                   negative: str = "benign", positive: str = "malignant", column: str = "pathology",
                   epochs: int = 20, seed: int = 0, progress: bool = False) -> DownstreamResult:
    """Train one classifier per training set (name → manifest rows) and score it on the real `test_df`.

    Every arm gets the same architecture, epochs, augmentation and seed. Columns:
    n_train, n_positive, AUC with its DeLong 95% CI, and DeLong's paired p
    against the first arm (the reference, e.g. real data or uncleaned data).
    """
    test_rows, y_true = binary_task(test_df, negative, positive, column)
    if y_true.min(initial=1) == y_true.max(initial=0):
        raise ValueError(f"the test set needs both {negative!r} and {positive!r} rows in {column!r}")
    test_images = load_images(test_rows, size)
    scores, rows = {}, []
    for name, df in train_sets.items():
        train_rows, labels = binary_task(df, negative, positive, column)
        if labels.sum() in (0, len(labels)):
            raise ValueError(f"training set {name!r} needs both {negative!r} and {positive!r} rows in {column!r}")
        probe = train_classifier(load_images(train_rows, size), torch.from_numpy(labels), 2, epochs, seed,
                                 classes=(negative, positive), progress=progress)
        scores[name] = probe.predict_proba(test_images)[:, 1]
        auc, lo, hi = delong_ci(y_true, scores[name])
        rows.append({"training set": name, "n_train": len(labels), "n_positive": int(labels.sum()),
                     "auc": auc, "ci_lo": lo, "ci_hi": hi})
    reference = next(iter(scores))
    for row in rows[1:]:
        row[f"delong_p_vs_{reference}"] = delong_test(y_true, scores[row["training set"]], scores[reference])[3]
    table = pd.DataFrame(rows)
    table.attrs["n_test"], table.attrs["n_test_positive"] = len(y_true), int(y_true.sum())
    return DownstreamResult(table, y_true, scores)
