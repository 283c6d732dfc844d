"""Notebook 10's joint experiment and figure: BUSGen's generated multi-view lesions as extra LR training data.

A generated lesion is BUSGen sampled `views` times with one real lesion's
conditions (its pathology, device and the boxes of one of its views) and
different noise seeds: the seeds play the part of the probe's other views.
Neither paper ran this; it asks whether such "views" carry the multi-view
signal LR learns from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt

from busgen_lib import plotting
from busgen_lib.data.manifest import read_manifest
from busgen_lib.diffusion import pipeline
from busgen_lib.downstream.lesion_recognition import PAPER, VARIANTS, lesion_rows
from busgen_lib.experiments.generalisation import absolute

PLAN_FILE = "lesion_plan.csv"


def lesion_plan(df: pd.DataFrame, n_lesions: int, views: int, seed: int = 0) -> pd.DataFrame:
    """`views` rows per generated lesion, each the conditions of one real lesion's first view; the source
    lesions are drawn half benign, half malignant (with replacement only when a class has too few)."""
    rows, _ = lesion_rows(df)
    first = rows.sort_values(["lesion_id", "view"]).groupby("lesion_id", sort=True).first().reset_index()
    rng = np.random.default_rng(seed)
    picks = []
    for k, pathology in enumerate(("benign", "malignant")):
        pool = first[first["pathology"] == pathology]
        n = n_lesions // 2 + (n_lesions % 2 if k == 0 else 0)
        picks.append(pool.iloc[rng.choice(len(pool), n, replace=n > len(pool))])
    sources = pd.concat(picks, ignore_index=True)
    plan = sources.loc[sources.index.repeat(views), ["pathology", "device", "boxes", "lesion_id"]]
    return plan.rename(columns={"lesion_id": "source_lesion"}).reset_index(drop=True)


def generated_lesions(model_dir: str | Path, df: pd.DataFrame, n_lesions: int, views: int, out: str | Path,
                      seed: int = 0, **sampling) -> pd.DataFrame:
    """Sample the plan with `pipeline.sample_dataset` (resumable, into `out`); rows with absolute paths, each
    generated lesion its own patient (`gen-L<k>`) and the real `source_lesion` it was conditioned on."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = lesion_plan(df, n_lesions, views, seed)
    plan[["pathology", "device", "boxes"]].to_csv(out / PLAN_FILE, index=False)
    manifest = read_manifest(pipeline.sample_dataset(model_dir, len(plan), out, plan=out / PLAN_FILE, seed=seed,
                                                     **sampling))
    rows = absolute(manifest)
    index = rows["index"].astype(int).to_numpy()
    lesion = [f"gen-L{i // views:05d}" for i in index]
    rows = rows.assign(lesion_id=lesion, patient_id=lesion, exam_id=lesion, view=[str(i % views) for i in index],
                       source_lesion=plan["source_lesion"].to_numpy()[index])
    return rows.sort_values("index", ignore_index=True)


def fold_auc_figure(table: pd.DataFrame, variants: Sequence[str], paper_column: str = "auc") -> plt.Figure:
    """Each fold's AUC (dots) and the mean ± SD per variant, the paper's AUC printed beside each row."""
    aucs = {VARIANTS[v].label: table.loc[table["variant"] == v, "auc"].to_numpy() for v in variants}
    notes = {label: f"paper {PAPER.loc[label, paper_column]}%" for label in aucs}
    fig = plotting.seeded_aucs(aucs, notes, reference=VARIANTS[variants[0]].label)
    fig.axes[0].set_xlabel("AUC on the held-out fold (dots: folds; bar: mean ± SD)")
    return fig
