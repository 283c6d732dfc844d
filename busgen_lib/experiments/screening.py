"""Screening (Fig 3): lesion detectors trained on real vs real + generated images, several seeds, resumable.

The paper's BUS-DM detector is trained on the real detection set "enhanced by
20,000 generated images" whose requested boxes are the labels (§4.4.1); the
baseline on the real set alone. Each (arm, seed) detector's test predictions
are kept as JSON, stamped with the digests of its training and test rows and the detector settings, so a
rerun evaluates without retraining and a killed run loses one detector at most.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from busgen_lib.atomic import write_text_atomic
from busgen_lib import plotting
from busgen_lib.data.manifest import read_manifest
from busgen_lib.downstream.detector import train_detector, training_steps
from busgen_lib.evaluate.detection import Prediction, evaluate_detection, paired_bootstrap_p, small_area_threshold
from busgen_lib.evaluate.scaling import mean_ci
from busgen_lib.experiments.generalisation import absolute, combine, digest
from busgen_lib.parallel import run_jobs
from busgen_lib.profiles import detector_settings

# The paper's Fig 3b-c: AP at IoU 0.5 overall and for the smallest 30% of lesions, baseline vs BUS-DM.
PAPER_AP = {"ap50_small": {"real": 0.657, "real + generated": 0.702}, "ap50": {"real": 0.912, "real + generated": 0.934}}


def step_matched_epochs(df: pd.DataFrame, reference_df: pd.DataFrame, profile: str) -> int:
    """Epochs on `df` that take at least as many optimiser steps as the profile's run on `reference_df`: the
    control that gives the real arm the augmented arm's training length (more data also means more steps)."""
    per_epoch = training_steps(df, profile, epochs=1)
    return math.ceil(training_steps(reference_df, profile) / per_epoch)


def detection_arms(real: pd.DataFrame, generated: pd.DataFrame, profile: str,
                   ) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Fig 3b-c's arms and their settings: real, real + generated (requested boxes as labels), and the real images
    for as many optimiser steps as the augmented arm (`step_matched_epochs`), for `detection_runs`."""
    arms = {"real": real, "real + generated": combine(real, generated), "real, as many steps": real}
    return arms, {"real, as many steps": {"epochs": step_matched_epochs(real, arms["real + generated"], profile)}}


def detection_runs(arms: Mapping[str, pd.DataFrame], test_df: pd.DataFrame, seeds: Sequence[int], profile: str,
                   out_dir: str | Path, progress: bool = True, overrides: Mapping[str, dict] | None = None,
                   workers: int | None = None) -> dict[tuple[str, int], list[Prediction]]:
    """Test-set predictions of one detector per (arm, seed), trained now or read back from `out_dir`; `overrides`
    gives an arm its own detector settings (e.g. `{"real, as many steps": {"epochs": 9}}`). Missing detectors
    train in `workers` processes (`parallel.run_jobs`; default: one per core)."""
    out_dir, test_stamp = Path(out_dir), digest(test_df)

    def files(job: tuple[str, int]) -> tuple[Path, dict]:
        arm, seed = job
        # as JSON gives it back (lists)
        settings = json.loads(json.dumps(asdict(detector_settings(profile, **(overrides or {}).get(arm, {})))))
        path = out_dir / arm.replace(" ", "").replace(",", "") / f"seed{seed}.json"
        return path, {"train": digest(arms[arm]), "test": test_stamp, "seed": int(seed), "settings": settings}

    def saved(job: tuple[str, int]) -> list[Prediction] | None:
        path, stamp = files(job)
        if path.exists() and (data := json.loads(path.read_text()))["stamp"] == stamp:
            return [{k: np.asarray(v) for k, v in p.items()} for p in data["predictions"]]
        return None

    def train_and_predict(job: tuple[str, int]) -> list[Prediction]:
        (arm, seed), (path, stamp) = job, files(job)
        predictions = train_detector(arms[arm], profile, seed=int(seed), progress=False,
                                     **(overrides or {}).get(arm, {})).predict(test_df)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"stamp": stamp, "predictions": [
            {k: np.asarray(v).tolist() for k, v in p.items()} for p in predictions]}))
        return predictions

    runs = {job: saved(job) for job in [(a, s) for a in arms for s in seeds]}
    pending = [job for job, predictions in runs.items() if predictions is None]
    runs |= dict(zip(pending, run_jobs(pending, train_and_predict, workers, progress=progress, desc="detectors")))
    return runs


def detection_table(runs: Mapping[tuple[str, int], list[Prediction]], test_df: pd.DataFrame, small_threshold: float,
                    reference: str, n_boot: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per seed, summary): AP50 and AP50_small per detector with image-bootstrap CIs and the paired bootstrap
    P against the `reference` arm of the same seed; the summary averages over seeds (t-intervals)."""
    rows = []
    for (arm, seed), predictions in runs.items():
        row = {"arm": arm, "seed": seed} | evaluate_detection(predictions, test_df, small_threshold, n_boot, seed)
        if arm != reference and (reference, seed) in runs:
            row |= paired_bootstrap_p(predictions, runs[(reference, seed)], test_df, small_threshold, n_boot, seed)
        rows.append(row)
    per_seed = pd.DataFrame(rows)
    summary = []
    for arm, g in per_seed.groupby("arm", sort=False):
        row = {"arm": arm, "seeds": len(g)}
        for metric in ("ap50", "ap50_small"):
            row |= dict(zip((metric, f"{metric}_lo", f"{metric}_hi"), mean_ci(g[metric].to_numpy())))
        summary.append(row)
    return per_seed, pd.DataFrame(summary)


def detection_tables_by(runs: Mapping[tuple[str, int], list[Prediction]], test_df: pd.DataFrame, column: str,
                        small_threshold: float, reference: str, n_boot: int = 1000
                        ) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """`detection_table` per value of `test_df[column]`: test sets scored in one pass (e.g. internal and external
    test images concatenated for `detection_runs`, so each detector trains once) and evaluated apart."""
    tables = {}
    for value, index in test_df.groupby(column, sort=False).indices.items():
        part = {key: [predictions[i] for i in index] for key, predictions in runs.items()}
        tables[value] = detection_table(part, test_df.iloc[index].reset_index(drop=True), small_threshold, reference,
                                        n_boot)
    return tables


@dataclass
class HeldOutDetection:
    """The detection arms on a leave-one-dataset-out design: per test set ("internal", "external"), the
    (per seed, summary) tables against the real arm, and the augmented arm against the step-matched control."""

    test_df: pd.DataFrame   # internal then external test images, `test` naming the set
    versus_real: dict[str, tuple[pd.DataFrame, pd.DataFrame]]
    versus_control: dict[str, tuple[pd.DataFrame, pd.DataFrame]]

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """For display, the test set as the outer index: the summary and the per-seed rows against the real arm,
        and the augmented arm's per-seed rows against the control."""
        def stacked(tables: dict, which: int) -> pd.DataFrame:
            return pd.concat({test: pair[which] for test, pair in tables.items()}, names=["test"])

        control = stacked(self.versus_control, 0)
        return (stacked(self.versus_real, 1), stacked(self.versus_real, 0),
                control[control["arm"] == "real + generated"])


def held_out_detection(pool: str | Path, held_out: str | Path, generated: pd.DataFrame, seeds: Sequence[int],
                       profile: str, out_dir: str | Path, progress: bool = False) -> HeldOutDetection:
    """Fig 3b-c's three arms on real data: detectors trained on the pool's train and val images (with and without
    lesions), on those plus `generated` (its requested boxes are the labels), and on the real images for as many
    optimiser steps as the augmented arm; tested on the pool's test split (internal) and on every image of the
    held-out set, normal ones included (external), in one pass (`detection_runs`, resumable)."""
    pool_df = absolute(read_manifest(pool))
    train = pool_df[pool_df["split"].astype(str).isin(["train", "val"])]
    test_df = pd.concat([pool_df[pool_df["split"].astype(str) == "test"].assign(test="internal"),
                         absolute(read_manifest(held_out)).assign(test="external")], ignore_index=True)
    arms, control = detection_arms(train, generated, profile)
    runs = detection_runs(arms, test_df, seeds, profile, out_dir, progress=progress, overrides=control)
    threshold = small_area_threshold(train)
    augmented = {key: p for key, p in runs.items() if key[0] != "real"}
    return HeldOutDetection(test_df, detection_tables_by(runs, test_df, "test", threshold, reference="real"),
                            detection_tables_by(augmented, test_df, "test", threshold,
                                                reference="real, as many steps"))


def detection_figure(per_seed: pd.DataFrame) -> plt.Figure:
    """Fig 3b-c: AP50 small and AP50 per arm, one dot per seed, the mean image-bootstrap CI as a bar, and the
    paper's value as a star for the arms it has."""
    arms = list(dict.fromkeys(per_seed["arm"]))
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 2.8), sharey=True)
    for ax, (metric, paper) in zip(axes, PAPER_AP.items()):
        for k, arm in enumerate(arms):
            g = per_seed[per_seed["arm"] == arm]
            colour = plotting.PALETTE["generated" if "generated" in arm else "real"]
            ax.scatter(np.full(len(g), k), g[metric], color=colour, zorder=3)
            mean = g[metric].mean()
            error = np.nan_to_num([[mean - g[f"{metric}_lo"].mean()], [g[f"{metric}_hi"].mean() - mean]])
            ax.errorbar(k, mean, yerr=error, fmt="_", color="k", capsize=4)
            if arm in paper:
                ax.scatter(k + 0.25, paper[arm], marker="*", color="#999999", label="paper" if k == 0 else None)
        ax.set(xticks=range(len(arms)), xticklabels=[a.replace(", ", ",\n") for a in arms],
               title=metric.replace("ap50", "AP@0.5").replace("_small", " small"))
    axes[0].set_ylabel("average precision")
    axes[0].legend(fontsize=6)
    return fig
