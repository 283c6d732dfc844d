"""Notebook 06's study design and figures: DCIS vs benign from few shots, the model against readers (§2.4, Fig 4a–d).

On the phantom, the DCIS cohort (patients never seen in pretraining) gives the
few-shot adaptation images (notebook 02) and, from its *other* patients, the
test DCIS lesions; the pretraining cohort's test patients give the benign test
lesions. Statistics live in `evaluate.readers` and `evaluate.stats`; this module
only cuts the data and draws.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from busgen_lib.data.cohorts import few_shot
from busgen_lib.errors import DataError
from busgen_lib.evaluate.readers import PAPER_PANEL, THRESHOLDS, birads_rank, operating_points
from busgen_lib.experiments.generalisation import absolute, combine

THRESHOLD_COLOURS = {"4a": "#4c72b0", "4b": "#55a868", "4c": "#dd8452"}  # the paper's blue, green, orange dots


def held_out_test(dcis: pd.DataFrame, pretrain: pd.DataFrame, shots: pd.DataFrame,
                  per_lesion: bool = True) -> pd.DataFrame:
    """Held-out real lesions: DCIS of patients with no few-shot image, benign of the pretraining cohort's test
    split; one view per lesion (its first row) when `per_lesion`, so cases are independent as readers' are."""
    unseen = dcis[~dcis["patient_id"].isin(shots["patient_id"])]
    benign = pretrain[(pretrain["split"] == "test") & (pretrain["pathology"] == "benign")]
    if unseen.empty or benign.empty:
        raise DataError(f"the early-diagnosis test needs held-out DCIS and benign lesions; found {len(unseen)} DCIS "
                        f"rows outside the few-shot patients and {len(benign)} benign test rows")
    rows = combine(absolute(unseen), absolute(benign))
    return combine(rows.drop_duplicates("lesion_id", keep="first")) if per_lesion else rows


def few_shot_real(shots: pd.DataFrame, pretrain: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Baseline-CLIP's real few-shot training set: the DCIS shots (labelled malignant) and as many benign
    training images of the pretraining cohort (spread over patients)."""
    benign = pretrain[pretrain["pathology"] == "benign"]
    return combine(absolute(shots), absolute(few_shot(benign, len(shots), seed, allow_fewer=True)))


def generated_training_set(dcis: pd.DataFrame, base: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """BUS-DM's training set: the DCIS-adapted model's images (malignant) and as many benign images of the base
    model, drawn at random, so the classes are balanced as the paper's category-balanced sampling makes them."""
    benign = base[base["pathology"] == "benign"]
    if dcis.empty or benign.empty:
        raise DataError(f"BUS-DM needs generated DCIS and benign images; got {len(dcis)} DCIS and {len(benign)} benign")
    benign = benign.sample(n=min(len(dcis), len(benign)), random_state=seed)
    return combine(absolute(dcis), absolute(benign))


def readers_figure(points: pd.DataFrame, title: str, y_true: np.ndarray | None = None,
                   score: np.ndarray | None = None, gains: pd.DataFrame | None = None) -> plt.Figure:
    """Fig 4c: each reader's operating points at the 4A, 4B and 4C thresholds, their mean at 4A and the paper's
    readers' mean; with `score`, the model's ROC, and with `gains`, the model's points matched to the readers'."""
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    if score is not None:
        fpr, tpr, _ = roc_curve(y_true, score)
        ax.plot(fpr, tpr, color="#c44e52", label="BUS-DM")
    for threshold in THRESHOLDS:
        p = points[points["threshold"] == threshold]
        if len(p) == 1:  # one reader (a real set's radiologists): its Wilson 95% CIs
            ax.errorbar(1 - p["specificity"], p["sensitivity"], color=THRESHOLD_COLOURS[threshold], lw=0.8,
                        xerr=[p["spec_hi"] - p["specificity"], p["specificity"] - p["spec_lo"]],
                        yerr=[p["sensitivity"] - p["sens_lo"], p["sens_hi"] - p["sensitivity"]], fmt="none")
        ax.scatter(1 - p["specificity"], p["sensitivity"], s=14, color=THRESHOLD_COLOURS[threshold],
                   label=f"{p['reader'].iloc[0] if len(p) == 1 else 'readers'}, BI-RADS ≥ {threshold.upper()}",
                   zorder=3)
    at_4a = points[points["threshold"] == "4a"]
    if len(at_4a) > 1:
        ax.scatter(1 - at_4a["specificity"].mean(), at_4a["sensitivity"].mean(), marker="x", color="k", s=30,
                   label="readers' mean (4A)", zorder=4)
    ax.scatter(1 - PAPER_PANEL["specificity"], PAPER_PANEL["sensitivity"], marker="+", color="#777777", s=40,
               label="paper's readers' mean (4A)", zorder=4)
    for row in (gains.itertuples() if gains is not None else ()):
        model_point = ((1 - row.matched_at, row.model) if row.comparison.startswith("sensitivity")
                       else (1 - row.model, row.matched_at))
        ax.scatter(*model_point, marker="o", facecolor="none", edgecolor="#c44e52", s=36, zorder=4)
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls="--")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", aspect="equal", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title=title)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def assisted_figure(table: pd.DataFrame, title: str) -> plt.Figure:
    """Fig 4d: each reader's accuracy (BI-RADS 4A threshold) before and after seeing the model, Wilson 95% CIs."""
    fig, ax = plt.subplots(figsize=(0.45 * len(table) + 1.6, 2.8))
    x = np.arange(len(table))
    for offset, column, lo, hi, colour, label in ((-0.15, "accuracy", "acc_lo", "acc_hi", "#7f7f7f", "alone"),
                                                  (0.15, "assisted", "assisted_lo", "assisted_hi", "#c44e52",
                                                   "with BUS-DM")):
        ax.errorbar(x + offset, table[column], yerr=[table[column] - table[lo], table[hi] - table[column]], fmt="o",
                    ms=3, capsize=2, color=colour, label=label)
    ax.set(xticks=x, xticklabels=[str(r).replace("reader_", "R") for r in table["reader"]], ylim=(0, 1.02),
           ylabel="accuracy (BI-RADS ≥ 4A)", title=title)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def real_reader_points(manifest: pd.DataFrame, positive: Mapping[str, str], negative: Mapping[str, str]
                       ) -> tuple[np.ndarray, pd.DataFrame]:
    """A real set's own radiologists' BI-RADS as one reader: (y, operating points) for the lesions matching
    `positive` (column → value) against `negative`, one row per lesion."""
    df = manifest.drop_duplicates("lesion_id")
    is_pos = np.logical_and.reduce([df[c].astype(str) == v for c, v in positive.items()])
    is_neg = np.logical_and.reduce([df[c].astype(str) == v for c, v in negative.items()])
    rows = df[is_pos | is_neg]
    y = is_pos[is_pos | is_neg].astype(int)
    ranks = pd.DataFrame({"radiologists": birads_rank(rows["birads"])})
    return y, operating_points(y, ranks)
