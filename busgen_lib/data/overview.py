"""Dataset summaries behind Fig 1a (hierarchy counts) and Fig 3a (lesion sizes)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from busgen_lib.data.schema import parse_boxes

# Fig 3a of the BUSGen paper: the smallest 30% of lesions have relative area < 0.068.
SMALL_LESION_QUANTILE = 0.30
PAPER_SMALL_LESION_THRESHOLD = 0.068


def _nonempty(series: pd.Series) -> pd.Series:
    return series[series.astype(str).str.len() > 0]


def hierarchy_counts(df: pd.DataFrame, by: str = "pathology") -> pd.DataFrame:
    """Patients, exams, lesions and images per value of `by` (Fig 1a's hierarchy).

    Lesions are counted by distinct non-empty `lesion_id`; datasets without exam
    or lesion ids (e.g. BUSI) report 0 rather than a guess.
    """
    rows = {}
    for key, sub in df.groupby(by, sort=True):
        rows[key] = {
            "patients": sub["patient_id"].nunique(),
            "exams": _nonempty(sub["exam_id"]).nunique(),
            "lesions": _nonempty(sub["lesion_id"]).nunique(),
            "images": len(sub),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["total"] = [df["patient_id"].nunique(), _nonempty(df["exam_id"]).nunique(),
                          _nonempty(df["lesion_id"]).nunique(), len(df)]
    table.index.name = by
    return table


def box_relative_areas(df: pd.DataFrame) -> np.ndarray:
    """Area of every lesion box relative to its image (boxes are relative, so w*h)."""
    areas = [(x1 - x0) * (y1 - y0) for text in df["boxes"] for x0, y0, x1, y1 in parse_boxes(text)]
    return np.asarray(areas, dtype=float)


def small_lesion_threshold(areas: np.ndarray, quantile: float = SMALL_LESION_QUANTILE) -> float:
    """The relative area below which the smallest `quantile` of lesions lie."""
    if len(areas) == 0:
        raise ValueError("no lesion boxes: the small-lesion threshold needs at least one box")
    return float(np.quantile(areas, quantile))


def birads_distribution(df: pd.DataFrame) -> pd.DataFrame:
    """Images per BI-RADS category and pathology (empty categories dropped)."""
    known = df[df["birads"].astype(str).str.len() > 0]
    return pd.crosstab(known["birads"], known["pathology"])


def example_grid(df: pd.DataFrame, rows: str, cols: str, max_cols: int = 6, seed: int = 0) -> pd.DataFrame:
    """Pick one image per (row value, column value) cell for an example grid.

    Returns a table indexed by row value with one column per chosen column
    value, holding the manifest index of the example (NaN where a cell is empty).
    """
    col_values = sorted(df[cols].astype(str).unique())[:max_cols]
    pick = (df[df[cols].astype(str).isin(col_values)]
            .sample(frac=1.0, random_state=seed)
            .groupby([rows, cols]).head(1))
    return pick.reset_index().pivot(index=rows, columns=cols, values="index")
