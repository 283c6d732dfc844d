"""Cohorts for few-shot adaptation: phenotypes the pretrained model never sees, and few-shot subsets.

The paper adapts a model pretrained on a general collection to tasks it did
not cover (DCIS from 34 images; prognosis cohorts). On the phantom, where every
lesion's subtype is known, that situation is made exact: every patient with a
lesion of a held-out subtype leaves the pretraining cohort, and that
subtype's images form its own adaptation cohort.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PRETRAIN = "pretrain"


def split_cohorts(df: pd.DataFrame, held_out: Sequence[str] = ("dcis", "tnbc")) -> dict[str, pd.DataFrame]:
    """{"pretrain": rows of patients without a held-out subtype, <subtype>: that subtype's rows, ...}.

    A patient with lesions of several held-out subtypes belongs to the first
    one in `held_out`; their other lesions' rows are in no cohort, so nothing
    of a held-out patient reaches pretraining.
    """
    subtype = df["subtype"].astype(str)
    missing = [s for s in held_out if not (subtype == s).any()]
    if missing:
        raise ValueError(f"no rows with subtype {missing}; the manifest's subtypes are {sorted(set(subtype))}")
    owner = pd.Series(PRETRAIN, index=df.index)
    for name in reversed(list(held_out)):  # the first listed wins
        patients = set(df.loc[subtype == name, "patient_id"])
        owner[df["patient_id"].isin(patients)] = name
    cohorts = {PRETRAIN: df[owner == PRETRAIN]}
    cohorts |= {name: df[(owner == name) & (subtype == name)] for name in held_out}
    for part in cohorts.values():
        part.attrs = dict(df.attrs)
    return cohorts


def few_shot(df: pd.DataFrame, n: int, seed: int = 0, split: str = "train", allow_fewer: bool = False
             ) -> pd.DataFrame:
    """`n` images of `split`, spread over as many patients as possible, deterministic per seed.

    Patients are shuffled and visited round-robin, one image each per round, so
    34 shots come from 34 lesions where the data has them, not 34 views of a few.
    With `allow_fewer`, a smaller split gives all its images instead of an error
    (the smoke profile's tiny phantom).
    """
    pool = df[df["split"].astype(str) == split]
    if len(pool) < n:
        if not allow_fewer or pool.empty:
            raise ValueError(f"asked for {n} few-shot images but split {split!r} has only {len(pool)}")
        n = len(pool)
    rng = np.random.default_rng(seed)
    patients = list(pool["patient_id"].unique())
    rng.shuffle(patients)
    queues = {p: list(rng.permutation(pool.index[pool["patient_id"] == p])) for p in patients}
    chosen: list = []
    while len(chosen) < n:
        for p in patients:
            if queues[p] and len(chosen) < n:
                chosen.append(queues[p].pop())
    out = df.loc[chosen]
    out.attrs = dict(df.attrs)
    return out
