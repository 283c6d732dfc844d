"""SIMULATED readers for the visual Turing test (§2.2, Fig 2a), for runs without a real reader study.

The paper's test had three radiologists call 100 images (50 generated, 50 real)
real or generated. Where no radiologists are at hand (the `demo` profile, CI),
notebook 04 simulates a panel and writes its answers as a reader-study export
(`turing.EXPORT_COLUMNS`), so that `turing.read_turing_export` and
`turing_table` run unchanged and a real export drops in with no code change.
Simulated answers say nothing about human perception: every figure made from
them must say "simulated".

Each simulated reader is an equal-variance Gaussian signal-detection observer:
for an image it perceives an evidence e ~ N(±d′/2, 1) (+ for generated) and
calls it generated when e > c (its criterion; 0 = unbiased), with a confidence
of 1–5 growing with |e − c|. Its accuracy is then Φ(d′/2) at c = 0, and its
ROC AUC Φ(d′/√2), so d′ can be set from a measured AUC (`dprime_from_auc`),
e.g. the real-vs-generated classifier's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.turing import EXPORT_COLUMNS, SOURCES

CONFIDENCE_STEP = 0.5       # |e − c| per confidence level above 1 (1: guessing … 5: certain)
MEAN_READING_SECONDS = 6.0  # mean of the simulated (exponential) time a reader spends on an image
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def dprime_from_auc(auc: float) -> float:
    """The d′ of an equal-variance Gaussian observer whose ROC AUC is `auc`: √2 Φ⁻¹(AUC)."""
    if not 0.0 < auc < 1.0:
        raise UsageError(f"an AUC strictly between 0 and 1 is needed to set d', got {auc}")
    return math.sqrt(2.0) * float(norm.ppf(auc))


def turing_items(real: pd.DataFrame, generated: pd.DataFrame, n_per_source: int, seed: int = 0) -> pd.DataFrame:
    """The images of a test: `n_per_source` rows drawn from each manifest frame (as `reader-study create` does),
    with opaque 16-hex-digit ids and the truth columns of the export."""
    rng = np.random.default_rng(seed)
    parts = []
    for source, df in zip(SOURCES, (real, generated)):
        if len(df) < n_per_source:
            raise DataError(f"{n_per_source} {source} images asked for the Turing test, only {len(df)} given")
        rows = df.iloc[np.sort(rng.choice(len(df), n_per_source, replace=False))]
        root = df.attrs.get("root", "")  # read_manifest's folder; paths are relative to it
        parts.append(pd.DataFrame({
            "truth_source": source, "truth_pathology": rows["pathology"].to_numpy(),
            "truth_birads": rows["birads"].to_numpy() if "birads" in rows else "",
            "truth_image": [str(Path(root) / p) for p in rows["image"]]}))
    items = pd.concat(parts, ignore_index=True)
    items.insert(0, "image_id", [f"{v:016x}" for v in rng.integers(0, 2 ** 63, len(items))])
    return items


def _per_reader(value: float | Sequence[float], readers: int, name: str) -> np.ndarray:
    values = np.broadcast_to(np.asarray(value, dtype=float), (readers,)) if np.ndim(value) == 0 else np.asarray(value)
    if len(values) != readers:
        raise UsageError(f"{name}: one value per reader ({readers}), got {len(values)}")
    return values


def simulate_turing_export(items: pd.DataFrame, readers: Sequence[str], d_prime: float | Sequence[float],
                           criterion: float | Sequence[float] = 0.0, seed: int = 0) -> pd.DataFrame:
    """A reader-study export (`turing.EXPORT_COLUMNS`, all strings) of SIMULATED readers answering every item.

    `d_prime` and `criterion` are one value for all readers or one per reader;
    each reader sees the items in an order of their own, as in the platform.
    """
    d_prime = _per_reader(d_prime, len(readers), "d_prime")
    criterion = _per_reader(criterion, len(readers), "criterion")
    generated = (items["truth_source"] == "generated").to_numpy()
    rng = np.random.default_rng(seed)
    truth = items[["image_id", "truth_source", "truth_pathology", "truth_birads", "truth_image"]]
    parts = []
    for k, (reader, d, c) in enumerate(zip(readers, d_prime, criterion)):
        order = rng.permutation(len(items))
        evidence = rng.normal(np.where(generated, d / 2, -d / 2), 1.0)[order]
        seconds = rng.exponential(MEAN_READING_SECONDS, len(items))
        answered = np.cumsum(seconds)
        session = START + timedelta(days=k)  # one reading session per reader
        parts.append(truth.iloc[order].reset_index(drop=True).assign(
            reader=reader, position=np.arange(len(items)), answer=np.where(evidence > c, "generated", "real"),
            confidence=1 + np.minimum(4, np.floor(np.abs(evidence - c) / CONFIDENCE_STEP)).astype(int),
            shown_at=[_iso(session, t) for t in answered - seconds],
            answered_at=[_iso(session, t) for t in answered]))
    return pd.concat(parts, ignore_index=True).reindex(columns=list(EXPORT_COLUMNS), fill_value="").astype(str)


def _iso(start: datetime, seconds: float) -> str:
    return (start + timedelta(seconds=float(seconds))).isoformat(timespec="milliseconds")
