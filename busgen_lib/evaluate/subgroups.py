"""Subgroup analyses (paper §2.5 and Supplementary §7): AUC per lesion size, device, BI-RADS, subtype, dataset.

One model's test scores are split by a grouping (a manifest column, or a
function of the rows such as `lesion_size_groups`) and the AUC of each group
gets the paper's 95% CI (§4.5: 1,000 bootstrap replications). A group with too
few cases of either class to score is kept in the table with the reason, never
dropped, so that a reader sees every subgroup the test set has.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from busgen_lib.data.overview import SMALL_LESION_QUANTILE
from busgen_lib.data.schema import parse_boxes
from busgen_lib.errors import UsageError
from busgen_lib.evaluate.stats import auc_ci

Grouping = str | Callable[[pd.DataFrame], "pd.Series | np.ndarray"]
ALL = "all"
NO_BOX = "no box"
MISSING = "(none)"
SIZE_QUANTILES = (SMALL_LESION_QUANTILE, 0.70)   # small = the paper's smallest 30% (Fig 3a); large = top 30%


def subgroup_auc(test_df: pd.DataFrame, y_true: np.ndarray, scores: np.ndarray, by: Grouping, *,
                 min_per_class: int = 5, level: float = 0.95, n_boot: int = 1000, seed: int = 0,
                 overall: bool = True) -> pd.DataFrame:
    """AUC with CI per subgroup of `test_df` (rows aligned with `y_true`, 1 = positive, and `scores`).

    `by` is a column name or a function of `test_df` returning one group label
    per row. Columns: group, n, n_pos, n_neg, auc, ci_lo, ci_hi, status; status
    is "ok" or why the group was not scored (fewer than `min_per_class` cases
    of a class). With `overall`, a first row "all" scores the whole test set.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    if not len(y) == len(s) == len(test_df):
        raise UsageError(f"test_df, y_true and scores must have one entry per test row; "
                         f"got {len(test_df)}, {len(y)} and {len(s)}")
    labels = _group_labels(test_df, by)
    groups = [(ALL, np.ones(len(y), dtype=bool))] if overall else []
    groups += [(g, (labels == g).to_numpy()) for g in _ordered_values(labels)]
    rows = []
    for name, member in groups:
        n_pos, n_neg = int(y[member].sum()), int((1 - y[member]).sum())
        row = {"group": name, "n": int(member.sum()), "n_pos": n_pos, "n_neg": n_neg,
               "auc": np.nan, "ci_lo": np.nan, "ci_hi": np.nan}
        if min(n_pos, n_neg) < min_per_class:
            row["status"] = f"too small: {n_pos} positive, {n_neg} negative (needs >= {min_per_class} of each)"
        else:
            row["auc"], row["ci_lo"], row["ci_hi"] = auc_ci(y[member], s[member], level=level, n_boot=n_boot,
                                                            seed=seed)
            row["status"] = "ok"
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["by"] = by if isinstance(by, str) else getattr(by, "__name__", "groups")
    return table


def lesion_size_groups(test_df: pd.DataFrame, train_df: pd.DataFrame,
                       quantiles: tuple[float, ...] = SIZE_QUANTILES) -> pd.Series:
    """Lesion-size bin of each test row by its largest box's relative area (Fig 3a's size measure).

    Bin edges are quantiles of the *training* lesion boxes (every box counts, as
    in Fig 3a), so the first edge is the smallest-30% threshold that the paper
    puts at 0.068 on its data. Rows without a box fall in "no box". The edges
    are in `.attrs["edges"]`.
    """
    train_areas = np.array([a for text in train_df["boxes"] for a in _areas(text)])
    if len(train_areas) == 0:
        raise UsageError("train_df has no lesion boxes: the size bins come from its boxes' relative areas")
    edges = [float(np.quantile(train_areas, q)) for q in quantiles]
    names = _bin_names(edges)
    areas = np.array([max(_areas(text), default=np.nan) for text in test_df["boxes"]])
    bins = np.searchsorted(edges, areas, side="right")
    labels = pd.Series([NO_BOX if np.isnan(a) else names[b] for a, b in zip(areas, bins)], index=test_df.index,
                       dtype=pd.CategoricalDtype([*names, NO_BOX], ordered=True))
    labels.attrs["edges"] = edges
    return labels


def birads_category(df: pd.DataFrame) -> pd.Series:
    """BI-RADS without the 4a/4b/4c subdivision, for the paper's "BI-RADS 4 subgroup" (§2.5)."""
    return df["birads"].astype(str).str.lower().str.replace(r"^4[abc]$", "4", regex=True)


def _areas(text: str) -> list[float]:
    return [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in parse_boxes(text)]


def _bin_names(edges: list[float]) -> list[str]:
    bounds = [f"{e:.3g}" for e in edges]
    inner = [f"{lo}-{hi}" for lo, hi in zip(bounds, bounds[1:])]
    return [f"< {bounds[0]}", *inner, f">= {bounds[-1]}"]


def _group_labels(df: pd.DataFrame, by: Grouping) -> pd.Series:
    if isinstance(by, str):
        if by not in df.columns:
            raise UsageError(f"no column {by!r} to group by; the test manifest has {', '.join(map(str, df.columns))}")
        return df[by].reset_index(drop=True).fillna(MISSING).replace("", MISSING)
    labels = by(df)
    if len(labels) != len(df):
        raise UsageError(f"the grouping function returned {len(labels)} labels for {len(df)} rows")
    return pd.Series(labels).reset_index(drop=True)


def _ordered_values(labels: pd.Series) -> list:
    """Categories in their own order (size bins), other values sorted as text (BI-RADS 2 < 3 < 4a ...)."""
    if isinstance(labels.dtype, pd.CategoricalDtype):
        return [c for c in labels.cat.categories if (labels == c).any()]
    return sorted(labels.unique(), key=str)
