"""Radiologist readers in the early-diagnosis study (§2.4, Fig 4c–d, Supplementary §5): BI-RADS reads, a
SIMULATED panel for runs without one, and the comparisons of a model with the panel.

The paper's nine radiologists gave each test lesion (DCIS or benign) a BI-RADS
category; a call is positive at BI-RADS 4A or above ("we assigned BI-RADS 2, 3
as benignity, and BI-RADS 4A+ as malignancy"). Their mean sensitivity was 81.3%
and mean specificity 37.9%; BUS-DM gained 16.5% (95% CI 11.7–21.5%) sensitivity
at the readers' mean specificity and 43.0% (32.8–53.6%) specificity at their mean
sensitivity, P < 0.0001 (permutation, 10,000). Readers then saw BUS-DM's output
and read again (Fig 4d: 8 of 9 more accurate).

**Reads** are a long table, one row per (reader, image): `reader, image, birads`
and optionally `birads_assisted` (the second read after seeing the model) —
`EXPORT_COLUMNS`, the format of a real study's export (`read_reader_export`).

**Simulated panel** (`simulate_panel`, `simulate_reads`), in the manner of the
Turing test's observers (`simulated_readers`): each reader is an equal-variance
Gaussian signal-detection observer. For an image it perceives evidence
e ~ N(0, 1) (benign) or N(d′, 1) (DCIS), independent of the image's pixels, and
answers the BI-RADS category whose band holds e: criteria c₄A < c₄B < c₄C < c₅,
one `BIRADS_STEP` apart. Given a reader's target sensitivity Se and specificity
Sp at 4A, c₄A = Φ⁻¹(Sp) and d′ = Φ⁻¹(Sp) + Φ⁻¹(Se) reproduce both exactly in
expectation. Per-reader targets are drawn around the panel's means with a
logit-normal spread, then shifted so the panel means equal the targets.

**Assisted second read** (simulated): the reader sees the model's probability s
and moves toward it with weight `trust`: e′ = (1 − trust)·e + trust·(c₄A + Φ⁻¹(s)),
i.e. the model's probit, placed so that s = ½ sits on the reader's own 4A
criterion. trust = 0 leaves every read unchanged, trust = 1 follows the model.
None of this says anything about real radiologists: every figure made from it
must say "simulated".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.metrics import roc_curve

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.stats import bootstrap_ci, permutation_test, proportion_ci

BIRADS = ("2", "3", "4a", "4b", "4c", "5")   # ordinal; the simulated panel answers 3 … 5
THRESHOLDS = ("4a", "4b", "4c")              # operating points of Fig 4c; 4a is the paper's
EXPORT_COLUMNS = ("reader", "image", "birads", "birads_assisted")  # the last is optional
APP_COLUMNS = {"truth_image": "image", "second_birads": "birads_assisted"}  # `reader-study export` → ours
BIRADS_STEP = 0.5   # evidence (in SDs of the benign class) between successive BI-RADS criteria (an assumption)
PAPER_PANEL = {"readers": 9, "sensitivity": 0.813, "specificity": 0.379,
               "sensitivity_gain": (0.165, 0.117, 0.215), "specificity_gain": (0.430, 0.328, 0.536)}


def birads_rank(values: Sequence[str] | pd.Series) -> np.ndarray:
    """Ordinal ranks (0 = BI-RADS 2 … 5 = BI-RADS 5) of BI-RADS categories; UsageError on an unknown one."""
    text = [_normalise(v) for v in values]
    bad = sorted({t for t in text if t not in BIRADS})
    if bad:
        raise UsageError(f"unknown BI-RADS categories {bad}; use one of {', '.join(BIRADS)}")
    return np.array([BIRADS.index(t) for t in text], dtype=int)


def _normalise(value: object) -> str:
    text = str(value).strip().lower()
    return text[:-2] if text.endswith(".0") else text   # a CSV column of "3", "5" reads back as floats


# --------------------------------------------------------------------------- the simulated panel

@dataclass(frozen=True)
class Reader:
    """One SIMULATED reader: target sensitivity and specificity at BI-RADS 4A."""

    name: str
    sensitivity: float
    specificity: float

    @property
    def d_prime(self) -> float:
        return float(norm.ppf(self.specificity) + norm.ppf(self.sensitivity))

    @property
    def criteria(self) -> np.ndarray:
        """Evidence cut-offs for 4a, 4b, 4c, 5 (a read is the number of cut-offs below e, plus BI-RADS 3)."""
        return norm.ppf(self.specificity) + BIRADS_STEP * np.arange(4)

    def birads(self, evidence: np.ndarray) -> np.ndarray:
        """BI-RADS categories (strings) for perceived evidence values."""
        return np.array(BIRADS)[1 + np.searchsorted(self.criteria, evidence, side="right")]


def simulate_panel(n_readers: int, sensitivity: float, specificity: float, spread: float = 0.4,
                   seed: int = 0) -> list[Reader]:
    """`n_readers` SIMULATED readers whose mean target sensitivity and specificity at 4A are the given ones.

    Each reader's targets are expit(logit(mean) + δ + shift), δ ~ N(0, spread²)
    (spread: a between-reader spread in logits; the paper reports only means),
    with the shift solved so the panel means are exact.
    """
    if n_readers < 1:
        raise UsageError(f"a reader panel needs at least one reader, got {n_readers}")
    for name, value in (("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 < value < 1.0:
            raise UsageError(f"the panel's mean {name} must lie strictly between 0 and 1, got {value}")
    rng = np.random.default_rng(seed)
    targets = [_around(mean, rng.normal(0.0, spread, n_readers)) for mean in (sensitivity, specificity)]
    return [Reader(f"reader_{k + 1}", float(se), float(sp)) for k, (se, sp) in enumerate(zip(*targets))]


def _around(mean: float, offsets: np.ndarray) -> np.ndarray:
    centred = offsets - offsets.mean()
    if np.allclose(centred, 0.0):  # one reader, or no spread: the mean itself
        return np.full(len(offsets), mean)
    base = logit(mean) + centred
    shift = brentq(lambda s: expit(base + s).mean() - mean, -20.0, 20.0, xtol=1e-12)
    return expit(base + shift)


def simulate_reads(readers: Sequence[Reader], images: Sequence[str], y_true: np.ndarray,
                   model_score: np.ndarray | None = None, trust: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """SIMULATED reads in the export format (`EXPORT_COLUMNS`): every reader reads every image once, and, when
    `model_score` (the model's probability per image) is given, again after seeing it (`birads_assisted`)."""
    y = np.asarray(y_true).astype(int)
    if len(images) != len(y) or (model_score is not None and len(model_score) != len(y)):
        raise UsageError(f"one truth label (and model score) per image: {len(images)} images, {len(y)} labels"
                         + ("" if model_score is None else f", {len(model_score)} scores"))
    if not 0.0 <= trust <= 1.0:
        raise UsageError(f"trust must lie in [0, 1], got {trust}")
    rng = np.random.default_rng(seed)
    parts = []
    for reader in readers:
        evidence = rng.normal(reader.d_prime * y, 1.0)
        part = pd.DataFrame({"reader": reader.name, "image": list(images), "birads": reader.birads(evidence)})
        if model_score is not None:
            s = np.clip(check_probability(model_score), 1e-4, 1 - 1e-4)  # Φ⁻¹(0 or 1) is infinite
            shown = reader.criteria[0] + norm.ppf(s)
            part["birads_assisted"] = reader.birads((1 - trust) * evidence + trust * shown)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- a real study's export

def read_reader_export(path: str | Path, truth: pd.Series) -> pd.DataFrame:
    """A reader study's CSV export, validated: `reader, image, birads[, birads_assisted]`, one row per
    (reader, image), every reader reading every image of `truth` (image → 0/1) and no other.

    The BI-RADS study of `python -m busgen_lib reader-study` exports
    `truth_image` and `second_birads`: they are read as `image` and
    `birads_assisted` (the latter dropped when no reader saw a model output).
    Errors name the file, row (as in a spreadsheet: header = row 1) and field.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: cannot read the reader export as CSV ({error})") from error
    if "image" not in df.columns and "truth_image" in df.columns:
        df = df.rename(columns=APP_COLUMNS)
        if "birads_assisted" in df.columns and not df["birads_assisted"].str.strip().any():
            df = df.drop(columns="birads_assisted")
    missing = [c for c in EXPORT_COLUMNS[:3] if c not in df.columns]
    if missing:
        raise DataError(f"{path}: the reader export lacks the column(s) {missing}; it needs "
                        f"{', '.join(EXPORT_COLUMNS[:3])} and optionally birads_assisted (found {list(df.columns)})")
    fields = [c for c in EXPORT_COLUMNS if c in df.columns]
    for field in fields:
        for i, value in enumerate(df[field]):
            text = _normalise(value)
            if not text:
                raise DataError(f"{path}, row {i + 2}, field {field!r}: empty")
            if field.startswith("birads") and text not in BIRADS:
                raise DataError(f"{path}, row {i + 2}, field {field!r}: {value!r} is not a BI-RADS category "
                                f"({', '.join(BIRADS)})")
    df = df[fields].assign(**{f: df[f].map(_normalise) for f in fields if f.startswith("birads")})
    twice = df.duplicated(["reader", "image"], keep="first")
    if twice.any():
        i = int(np.flatnonzero(twice)[0])
        raise DataError(f"{path}, row {i + 2}: reader {df['reader'].iloc[i]!r} read image {df['image'].iloc[i]!r} "
                        f"twice; one row per reader and image")
    unknown = ~df["image"].isin(truth.index)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(f"{path}, row {i + 2}, field 'image': {df['image'].iloc[i]!r} is not a test image "
                        f"({int(unknown.sum())} such rows)")
    for reader, rows in df.groupby("reader", sort=False):
        lacking = truth.index.difference(rows["image"])
        if len(lacking):
            raise DataError(f"{path}: reader {reader!r} has no read of {len(lacking)} test image(s), e.g. "
                            f"{lacking[0]!r}; the comparisons are paired, so every reader reads every image")
    return df


def reads_matrix(reads: pd.DataFrame, truth: pd.Series, column: str = "birads") -> pd.DataFrame:
    """BI-RADS ranks, one row per image of `truth` (its order) and one column per reader."""
    wide = reads.pivot(index="image", columns="reader", values=column).reindex(truth.index)
    if wide.isna().any().any():
        raise DataError(f"reads lack some (reader, image) pairs in {column!r}; validate with read_reader_export")
    return wide.apply(birads_rank)


# --------------------------------------------------------------------------- analysis

def operating_points(y_true: np.ndarray, ranks: pd.DataFrame, thresholds: Sequence[str] = THRESHOLDS) -> pd.DataFrame:
    """Each reader's sensitivity and specificity (Wilson 95% CIs) when BI-RADS ≥ threshold is a positive call."""
    y = np.asarray(y_true).astype(bool)
    rows = []
    for reader in ranks.columns:
        for threshold in thresholds:
            call = ranks[reader].to_numpy() >= BIRADS.index(threshold)
            se, se_lo, se_hi = proportion_ci(int(call[y].sum()), int(y.sum()))
            sp, sp_lo, sp_hi = proportion_ci(int((~call[~y]).sum()), int((~y).sum()))
            rows.append({"reader": reader, "threshold": threshold, "sensitivity": se, "sens_lo": se_lo,
                         "sens_hi": se_hi, "specificity": sp, "spec_lo": sp_lo, "spec_hi": sp_hi})
    return pd.DataFrame(rows)


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float) -> tuple[float, float]:
    """(sensitivity, threshold): the model's best sensitivity among thresholds whose specificity is ≥ the given
    one (calls are score ≥ threshold), read off the empirical ROC (sklearn's roc_curve)."""
    fpr, tpr, thr = roc_curve(np.asarray(y_true).astype(int), score)
    ok = 1.0 - fpr >= specificity - 1e-12
    k = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[k]), float(thr[k])


def specificity_at_sensitivity(y_true: np.ndarray, score: np.ndarray, sensitivity: float) -> tuple[float, float]:
    """(specificity, threshold): the model's best specificity among thresholds whose sensitivity is ≥ the given
    one (the mirror of `sensitivity_at_specificity`)."""
    fpr, tpr, thr = roc_curve(np.asarray(y_true).astype(int), score)
    ok = tpr >= sensitivity - 1e-12
    k = int(np.flatnonzero(ok)[np.argmax(1.0 - fpr[ok])])
    return float(1.0 - fpr[k]), float(thr[k])


def _sensitivity_gain(y: np.ndarray, score: np.ndarray, calls: np.ndarray) -> float:
    y = y.astype(bool)
    return sensitivity_at_specificity(y, score, (~calls[~y]).mean())[0] - calls[y].mean()


def _specificity_gain(y: np.ndarray, score: np.ndarray, calls: np.ndarray) -> float:
    y = y.astype(bool)
    return specificity_at_sensitivity(y, score, calls[y].mean())[0] - (~calls[~y]).mean()


def matched_gains(y_true: np.ndarray, score: np.ndarray, ranks: pd.DataFrame, threshold: str = "4a",
                  n_boot: int = 1000, n_perm: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """The model against the readers' mean operating point at `threshold` (§2.4): its sensitivity gain at
    the readers' mean specificity and its specificity gain at their mean sensitivity.

    CIs: stratified bootstrap of cases (readers and model resampled together).
    P: paired permutation test (`stats.permutation_test`), on the cases of the
    class in question, of the model's calls at the matched threshold against the
    readers' mean call on each case.
    """
    y = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=float)
    calls = ranks.to_numpy() >= BIRADS.index(threshold)
    readers_se, readers_sp = calls[y].mean(), (~calls[~y]).mean()
    rows = []
    for name, gain, (model, cut), cls, matched, reader_value in (
            ("sensitivity at readers' mean specificity", _sensitivity_gain,
             sensitivity_at_specificity(y, score, readers_sp), y, readers_sp, readers_se),
            ("specificity at readers' mean sensitivity", _specificity_gain,
             specificity_at_sensitivity(y, score, readers_se), ~y, readers_se, readers_sp)):
        correct_model = (score[cls] >= cut) == y[cls]
        correct_readers = (calls[cls] == y[cls, None]).mean(axis=1)
        estimate, lo, hi = bootstrap_ci(gain, y.astype(int), score, calls, n_boot=n_boot, seed=seed, stratify=y)
        p = permutation_test(np.mean, correct_model.astype(float), correct_readers, n_perm=n_perm, seed=seed,
                             paired=True)
        rows.append({"comparison": name, "matched_at": matched,
                     "readers": reader_value, "model": model, "gain": estimate, "ci_lo": lo, "ci_hi": hi, "p": p,
                     "model_threshold": cut})
    return pd.DataFrame(rows)


def assisted_accuracy(y_true: np.ndarray, before: pd.DataFrame, after: pd.DataFrame, threshold: str = "4a",
                      n_perm: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Each reader's accuracy at `threshold` before and after seeing the model (Fig 4d), Wilson 95% CIs, and the
    paired permutation P of the change (cases are the pairs)."""
    y = np.asarray(y_true).astype(bool)
    if list(before.columns) != list(after.columns):
        raise UsageError("before and after reads must have the same readers in the same order")
    rows = []
    cut = BIRADS.index(threshold)
    for reader in before.columns:
        first, second = ((m[reader].to_numpy() >= cut) == y for m in (before, after))
        acc, lo, hi = proportion_ci(int(first.sum()), len(y))
        acc2, lo2, hi2 = proportion_ci(int(second.sum()), len(y))
        p = permutation_test(np.mean, first.astype(float), second.astype(float), n_perm=n_perm, seed=seed, paired=True)
        rows.append({"reader": reader, "accuracy": acc, "acc_lo": lo, "acc_hi": hi, "assisted": acc2,
                     "assisted_lo": lo2, "assisted_hi": hi2, "change": acc2 - acc, "p": p})
    return pd.DataFrame(rows)


def check_probability(score: np.ndarray) -> np.ndarray:
    """Scores as floats in [0, 1] (the assisted-read model reads them as probabilities)."""
    s = np.asarray(score, dtype=float)
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0):
        raise UsageError(f"model scores must be probabilities in [0, 1], got range {s.min():.3g}–{s.max():.3g}"
                         if np.all(np.isfinite(s)) else "model scores contain NaN or infinity")
    return s
