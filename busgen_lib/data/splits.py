"""Patient-level, stratified, seeded train/val/test splits.

Views of one lesion, and lesions of one patient, must never straddle splits
(DESIGN.md): we split *groups* (patients; for BUSI, its near-duplicate groups),
stratified by each group's most severe pathology, deterministically by seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from busgen_lib.data.schema import PATHOLOGIES, SPLITS

_SEVERITY = {p: i for i, p in enumerate(PATHOLOGIES)}  # normal < benign < malignant


def assign_splits(
    df: pd.DataFrame,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    group_col: str = "patient_id",
    stratify_col: str = "pathology",
) -> pd.DataFrame:
    """Return a copy of `df` with `split` set so that every group lies in one split.

    Within each stratum (a group's most severe pathology) groups are shuffled by
    `seed` and dealt to splits greedily so that each split's share of *images*
    tracks `fractions`; large groups therefore cannot silently unbalance a split.
    """
    if len(fractions) != len(SPLITS) or not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {fractions}")
    if df[group_col].isna().any() or (df[group_col].astype(str) == "").any():
        raise ValueError(f"column {group_col!r} has empty values; every row needs a group to split by")
    rng = np.random.default_rng(seed)
    sizes = df.groupby(group_col, sort=True).size()
    strata = df.groupby(group_col, sort=True)[stratify_col].agg(lambda s: max(s, key=lambda p: _SEVERITY.get(p, -1)))
    target = np.asarray(fractions, dtype=float)
    assignment: dict[object, str] = {}
    for stratum in sorted(strata.unique(), key=str):
        groups = strata.index[strata == stratum].to_numpy()
        groups = groups[rng.permutation(len(groups))]
        filled = np.zeros(len(SPLITS))
        for group in groups:
            # Deal to the split that is furthest below its target share.
            deficit = target * (filled.sum() + sizes[group]) - filled
            k = int(np.argmax(deficit))
            assignment[group] = SPLITS[k]
            filled[k] += sizes[group]
    out = df.copy()
    out["split"] = out[group_col].map(assignment)
    return out
