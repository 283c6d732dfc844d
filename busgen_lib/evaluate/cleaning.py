"""Cleaning generated data (§4.3.2): drop samples a real-data classifier says contradict their condition.

A generated image's label is the condition it was asked for. Where the
generator failed (a "malignant" request that came out looking benign), that
label is wrong, and a downstream model trained on it learns noise. The paper
removes such samples with a classifier trained on real data. Here a sample is
rejected when the classifier's most probable class is not the requested one
*and* its probability is at least `confidence`; `confidence=0` rejects every
disagreement, higher values only confident ones. Every rejection is logged
with its reason, and rejection rates per requested class carry Wilson CIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.data.dataset import load_images
from busgen_lib.evaluate.probes import Probe, train_classifier
from busgen_lib.evaluate.stats import proportion_ci

KEPT_MANIFEST, REJECTED_LOG = "manifest_clean.csv", "rejected.csv"


@dataclass
class CleaningResult:
    """Kept rows, rejected rows (with `predicted`, `p_predicted`, `p_requested`, `reason`) and rates per class."""

    kept: pd.DataFrame
    rejected: pd.DataFrame
    rates: pd.DataFrame

    @property
    def rejection_rate(self) -> float:
        return len(self.rejected) / max(1, len(self.kept) + len(self.rejected))


def rejection_rates(requested: pd.Series, rejected: np.ndarray, column: str) -> pd.DataFrame:
    """Per requested class: n, rejected, rate and its Wilson 95% CI; plus an `all` row."""
    rows = []
    for key, mask in [*((k, (requested == k).to_numpy()) for k in requested.unique()), ("all", np.ones(len(requested), bool))]:
        n, r = int(mask.sum()), int(rejected[mask].sum())
        p, lo, hi = proportion_ci(r, n)
        rows.append({column: key, "n": n, "rejected": r, "rate": p, "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows)


def clean(generated: pd.DataFrame, classifier: Probe, images: torch.Tensor, column: str = "pathology",
          confidence: float = 0.5) -> CleaningResult:
    """Judge each generated row's `column` (its requested label) by `classifier` on its image.

    `images` (N, 1, S, S) in [-1, 1] at the classifier's resolution, in row order.
    Requests for a class the classifier does not know are an error (it cannot judge them).
    """
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must lie in [0, 1], got {confidence}")
    if len(images) != len(generated):
        raise ValueError(f"{len(generated)} generated rows but {len(images)} images")
    requested = generated[column].astype(str).reset_index(drop=True)
    unknown = sorted(set(requested) - set(classifier.classes))
    if unknown:
        raise ValueError(f"cannot clean on {column!r}: requested {unknown} are not among the classifier's classes "
                         f"{list(classifier.classes)}")
    proba = classifier.predict_proba(images)
    index = {c: k for k, c in enumerate(classifier.classes)}
    target = requested.map(index).to_numpy()
    predicted = proba.argmax(axis=1)
    p_predicted = proba[np.arange(len(proba)), predicted]
    p_requested = proba[np.arange(len(proba)), target]
    reject = (predicted != target) & (p_predicted >= confidence)

    judged = generated.reset_index(drop=True).assign(
        predicted=[classifier.classes[k] for k in predicted], p_predicted=p_predicted, p_requested=p_requested)
    judged.attrs = dict(generated.attrs)
    rejected = judged[reject].copy()
    rejected["reason"] = [f"requested {column} {r!r}, classifier says {p!r} (p={q:.2f} >= {confidence:.2f})"
                          for r, p, q in zip(rejected[column], rejected["predicted"], rejected["p_predicted"])]
    kept = judged[~reject].drop(columns=["predicted", "p_predicted", "p_requested"])
    kept.attrs = dict(generated.attrs)
    return CleaningResult(kept, rejected, rejection_rates(requested, reject, column))


def fit_label_classifier(real_df: pd.DataFrame, column: str = "pathology", size: int = 32, epochs: int = 20,
                         seed: int = 0, progress: bool = False) -> Probe:
    """A real-data classifier of `column` for cleaning, trained on the train and val splits.

    Its accuracy on the test split is `reference_accuracy`: how often the judge
    itself is right on real images, which bounds how trustworthy a rejection is.
    A downstream "real" arm trained on the same train and val rows shares these
    images with the judge (as with the generator): say so where they are compared.
    """
    classes = tuple(sorted(set(real_df[column].astype(str))))
    if len(classes) < 2:
        raise ValueError(f"a cleaning classifier needs at least two {column!r} classes, the data has {list(classes)}")
    index = {c: k for k, c in enumerate(classes)}

    def part(splits: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows = real_df[real_df["split"].astype(str).isin(splits)]
        rows.attrs = dict(real_df.attrs)
        labels = torch.tensor(rows[column].astype(str).map(index).to_numpy(dtype=np.int64))
        return (load_images(rows, size), labels) if len(rows) else None

    train, test = part(("train", "val")), part(("test",))
    if train is None:
        raise ValueError("a cleaning classifier needs rows in the train or val split")
    probe = train_classifier(*train, len(classes), epochs, seed, classes=classes, progress=progress)
    probe.reference_accuracy = probe.accuracy(*test) if test is not None else None
    return probe


def clean_dataset(manifest: str | Path, classifier: Probe, images: torch.Tensor, column: str = "pathology",
                  confidence: float = 0.5) -> CleaningResult:
    """`clean` a generated dataset folder: writes `manifest_clean.csv` and `rejected.csv` beside its manifest.

    The original manifest and images stay untouched, so a different threshold
    can be tried without generating again.
    """
    manifest = Path(manifest)
    result = clean(read_manifest(manifest), classifier, images, column, confidence)
    write_manifest(result.kept, manifest.parent / KEPT_MANIFEST)
    log = result.rejected.copy()
    root = Path(log.attrs.get("root", manifest.parent))
    log["image"] = [str(root / p) for p in log["image"].astype(str)]  # absolute: a log is read by people
    log.to_csv(manifest.parent / REJECTED_LOG, index=False)
    return result
