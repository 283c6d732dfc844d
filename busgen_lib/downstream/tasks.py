"""What a downstream model predicts: a binary task over one manifest column, or lesion detection (§4.4).

The CLI names a task in one string, so any dataset drops in:

- `benign-malignant` — pathology, benign = 0, malignant = 1 (lesion diagnosis, §4.4.3);
- `<column>:<neg>,<pos>` — any manifest column, e.g. `subtype:fibroadenoma,dcis` (early diagnosis,
  §4.4.2) or `tnbc:0,1` (prognosis, §4.4.4); rows with other values are left out;
- `detection` — lesion boxes (§4.4.1), handled by `busgen_lib.downstream.detector`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from busgen_lib.errors import DataError, UsageError

BENIGN_MALIGNANT = "benign-malignant"
DETECTION = "detection"


@dataclass(frozen=True)
class Task:
    """A binary label read from `column` (`negative` → 0, `positive` → 1), or detection (column "boxes")."""

    column: str
    negative: str = ""
    positive: str = ""

    @classmethod
    def parse(cls, text: str) -> Task:
        """The task named by a CLI string; a UsageError says which forms exist."""
        text = text.strip()
        if text == BENIGN_MALIGNANT:
            return cls("pathology", "benign", "malignant")
        if text == DETECTION:
            return cls("boxes")
        column, sep, classes = text.partition(":")
        labels = [c.strip() for c in classes.split(",")]
        if not sep or not column.strip() or len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
            raise UsageError(f"unknown task {text!r}: use {BENIGN_MALIGNANT}, {DETECTION}, or "
                             "<column>:<negative>,<positive> (e.g. subtype:fibroadenoma,dcis or tnbc:0,1)")
        return cls(column.strip(), labels[0], labels[1])

    @property
    def is_detection(self) -> bool:
        return self.column == "boxes" and not self.negative

    def __str__(self) -> str:
        if self.is_detection:
            return DETECTION
        if (self.column, self.negative, self.positive) == ("pathology", "benign", "malignant"):
            return BENIGN_MALIGNANT
        return f"{self.column}:{self.negative},{self.positive}"

    def select(self, df: pd.DataFrame, source: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
        """(rows, y): the rows labelled negative or positive, and y in {0, 1}.

        `source` names the manifest in errors (default: `df.attrs["source"]`). A
        missing column, or a class with no row, is a DataError: a model cannot be
        trained or scored on it.
        """
        source = source or df.attrs.get("source", "manifest")
        if self.is_detection:
            raise UsageError("the detection task has no class labels; use busgen_lib.downstream.detector")
        if self.column not in df.columns:
            raise DataError(f"{source}: task {self} needs a column {self.column!r}, which the manifest lacks "
                            f"(columns: {', '.join(map(str, df.columns))})")
        values = df[self.column]
        is_neg, is_pos = _matches(values, self.negative), _matches(values, self.positive)
        for name, hit in (("negative", is_neg), ("positive", is_pos)):
            if not hit.any():
                seen = sorted({str(v) for v in values if not _is_blank(v)})[:12]
                raise DataError(f"{source}: task {self} needs {name} rows ({self.column} = "
                                f"{self.negative if name == 'negative' else self.positive!r}), but there are none; "
                                f"values present: {', '.join(seen) or 'none'}")
        keep = is_neg | is_pos
        rows = df.loc[keep.to_numpy()]
        return rows, is_pos.to_numpy()[keep.to_numpy()].astype(np.int64)


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan")


def _matches(values: pd.Series, label: str) -> pd.Series:
    """Rows equal to `label`: as text (case-insensitive), or as numbers when both are numeric.

    Numbers matter because a CSV column with gaps reads back as floats ("1.0") while
    users type `tnbc:0,1`.
    """
    text = values.astype(str).str.strip().str.lower()
    same = text == label.strip().lower()
    try:
        target = float(label)
    except ValueError:
        return same
    numeric = pd.to_numeric(values, errors="coerce")
    return same | (numeric == target)
