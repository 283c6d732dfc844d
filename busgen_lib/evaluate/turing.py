"""Visual Turing test statistics (paper §2.2, Fig 2a) from a reader-study export.

The paper showed three radiologists 50 real and 50 generated images and
reported, per reader, how many generated images were called real ("50%-75%")
and the accuracy of telling them apart. This module reads the CSV that the
reader-study platform (`busgen_lib.reader_study`, README "Reader studies")
exports, unchanged, and computes per reader and pooled:

* accuracy with a Wilson (or exact Clopper-Pearson) interval and a two-sided
  exact binomial test against 50% (a reader at chance cannot tell them apart);
* the share of generated images called real;
* sensitivity (generated called generated) and specificity (real called real)
  for "generated" as the positive class;

and Fleiss' kappa for the agreement of the readers on the images all of them
answered. statsmodels gives the intervals and kappa, scipy the binomial test.

The pooled row counts every answer as one trial; answers of several readers on
the same images are not independent, so its interval is descriptive, and the
per-reader rows are the ones to test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

from busgen_lib.errors import DataError, UsageError

# The reader-study export, column by column (README "Reader studies" documents each).
EXPORT_COLUMNS: tuple[str, ...] = (
    "reader", "image_id", "position",
    "truth_source", "truth_pathology", "truth_birads", "truth_image",
    "answer", "confidence", "birads", "model_output", "second_birads",
    "shown_at", "answered_at", "second_answered_at",
)
SOURCES: tuple[str, ...] = ("real", "generated")
POOLED = "pooled"
CI_METHODS = {"wilson": "wilson", "exact": "beta"}  # our name -> statsmodels' (beta = Clopper-Pearson)


def read_turing_export(path: str | Path) -> pd.DataFrame:
    """The Turing-test answers of a reader-study export, checked: one row per (reader, image), known values.

    Raises DataError naming the file, row and column of the first problems.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: reader-study export not found; write it with "
                        "`python -m busgen_lib reader-study export` or the organiser page")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in EXPORT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a reader-study export, missing column(s) {', '.join(missing)}")
    if not df.empty and (df["answer"] == "").all():
        raise DataError(f"{path}: no real/generated answers: the study asked another question (BI-RADS)")
    problems = []
    for column, allowed in (("answer", SOURCES), ("truth_source", SOURCES)):
        bad = ~df[column].isin(allowed)
        problems += [f"{path}: row {i + 1}: {column}: {df[column].iloc[i]!r} is not one of {', '.join(allowed)}"
                     for i in np.flatnonzero(bad.to_numpy())[:3]]
    duplicated = df.duplicated(["reader", "image_id"], keep=False).to_numpy()
    problems += [f"{path}: row {i + 1}: reader {df['reader'].iloc[i]!r} answered image {df['image_id'].iloc[i]!r} "
                 "more than once" for i in np.flatnonzero(duplicated)[:3]]
    if problems:
        raise DataError("\n".join(problems))
    if df.empty:
        raise DataError(f"{path}: no answers yet")
    return df


def _proportion(successes: int, n: int, level: float, method: str) -> tuple[float, float, float]:
    if n == 0:
        return np.nan, np.nan, np.nan
    lo, hi = proportion_confint(successes, n, alpha=1.0 - level, method=CI_METHODS[method])
    return successes / n, float(lo), float(hi)


def _row(reader: str, rows: pd.DataFrame, level: float, method: str) -> dict:
    generated = rows["truth_source"] == "generated"
    called_generated = rows["answer"] == "generated"
    n, correct = len(rows), int((called_generated == generated).sum())
    out = {"reader": reader, "n": n, "n_generated": int(generated.sum()), "n_real": int((~generated).sum()),
           "correct": correct}
    for name, (k, m) in {"accuracy": (correct, n),
                         "generated_called_real": (int((generated & ~called_generated).sum()), int(generated.sum())),
                         "sensitivity": (int((generated & called_generated).sum()), int(generated.sum())),
                         "specificity": (int((~generated & ~called_generated).sum()), int((~generated).sum()))}.items():
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = _proportion(k, m, level, method)
    out["p_vs_chance"] = binomtest(correct, n, 0.5).pvalue
    return out


def turing_table(answers: pd.DataFrame, level: float = 0.95, method: str = "wilson") -> pd.DataFrame:
    """One row per reader, then a pooled row: accuracy, generated-called-real, sensitivity, specificity with CIs.

    `method` is "wilson" (default, as `stats.proportion_ci`) or "exact" (Clopper-Pearson); `p_vs_chance` is the
    two-sided exact binomial test of the accuracy against 0.5.
    """
    if method not in CI_METHODS:
        raise UsageError(f"CI method {method!r} unknown; use one of {', '.join(CI_METHODS)}")
    rows = [_row(reader, group, level, method) for reader, group in answers.groupby("reader", sort=True)]
    rows.append(_row(POOLED, answers, level, method))
    return pd.DataFrame(rows)


def readers_kappa(answers: pd.DataFrame) -> tuple[float, int]:
    """(Fleiss' kappa of the real/generated calls, number of images) over the images every reader answered.

    Kappa needs the same raters on every image, so images some readers skipped are left out; it is nan with
    fewer than two readers or no image answered by all.
    """
    readers = answers["reader"].nunique()
    wide = answers.pivot(index="image_id", columns="reader", values="answer").dropna()
    if readers < 2 or wide.empty:
        return np.nan, len(wide)
    table, _ = aggregate_raters(wide.to_numpy())
    return float(fleiss_kappa(table, method="fleiss")), len(wide)
