"""Data-scaling curves (paper §2.5, Fig 4e): test loss and AUC against training-set size.

For each size and repeat, a class-balanced random subset of a pool (real or
generated images) is drawn by patient, a model is trained on it with the given
`TrainFn`, and its AUC and binary cross-entropy on a fixed test set are
recorded — the paper "randomly sampled images in different data scales ...
repeatedly sampled 5 times at each data scale" (§4.4.3). Each finished
(size, repeat) is appended to a CSV at once, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.metrics import log_loss, roc_auc_score

from busgen_lib.data.dataset import derive_seed
from busgen_lib.data.manifest import rows_fingerprint
from busgen_lib.errors import UsageError
from busgen_lib.plotting import PALETTE
from busgen_lib.evaluate.training import SEED_LIMIT, TrainFn, probabilities, recipe_of
from busgen_lib.evaluate.utility import binary_task
from busgen_lib.parallel import imap_jobs

RESULT_COLUMNS = ("name", "size", "repeat", "seed", "n_train", "n_pos_train", "n_patients", "auc", "loss")


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of repeat `repeat`: it draws the subsets (at every size) and seeds the TrainFn."""
    return derive_seed(seed, repeat) % SEED_LIMIT


def draw_subset(pool: pd.DataFrame, size: int, seed: int, *, column: str = "pathology", negative: str = "benign",
                positive: str = "malignant", group: str = "patient_id") -> pd.DataFrame:
    """`size` rows of `pool`, half of each class (the odd one negative), taken patient by patient.

    Per class, patients are put in a seeded random order (and each patient's
    images too) and images are taken in that order until the class quota is
    met, so a subset holds whole patients but the last. The same seed gives
    nested subsets across sizes: a larger subset extends a smaller one.
    """
    rows, y = binary_task(pool, negative, positive, column)
    quota = {1: size // 2, 0: size - size // 2}
    picked = []
    for label, name in ((0, negative), (1, positive)):
        members = rows[y == label]
        if len(members) < quota[label]:
            raise UsageError(f"the pool has {len(members)} {name!r} images in {column!r}; a class-balanced subset "
                             f"of {size} needs {quota[label]}. Lower the largest size or enlarge the pool.")
        rng = np.random.default_rng([seed, label])
        patients = members[group].astype(str)
        unique = np.sort(patients.unique())
        patient_rank = dict(zip(unique[rng.permutation(len(unique))], range(len(unique))))
        order = np.lexsort((rng.permutation(len(members)), patients.map(patient_rank).to_numpy()))
        picked.append(members.iloc[order[: quota[label]]])
    subset = pd.concat(picked)
    subset.attrs = dict(pool.attrs)
    return subset


def feasible_sizes(pools: Sequence[pd.DataFrame], sizes: Sequence[int], *, column: str = "pathology",
                   negative: str = "benign", positive: str = "malignant") -> list[int]:
    """The `sizes` whose class-balanced subsets (`draw_subset`) every pool can fill, so curves share their x values."""
    def fits(pool: pd.DataFrame, size: int) -> bool:
        _, y = binary_task(pool, negative, positive, column)
        return (y == 1).sum() >= size // 2 and (y == 0).sum() >= size - size // 2

    return [size for size in sizes if all(fits(pool, size) for pool in pools)]


def scaling_curve(train_fn: TrainFn, pool: pd.DataFrame, test_df: pd.DataFrame, sizes: Sequence[int], repeats: int,
                  results_csv: str | Path, *, name: str = "", seed: int = 0, column: str = "pathology",
                  negative: str = "benign", positive: str = "malignant", group: str = "patient_id",
                  progress: bool = True, workers: int | None = None) -> pd.DataFrame:
    """One row per (size, repeat): training set counts, test AUC and test loss (sklearn log_loss).

    Rows already in `results_csv` (from an interrupted run with the same seed)
    are kept and skipped; every new row is appended as soon as it is done. A
    results file of another pool, test set or TrainFn recipe (its `.json`
    stamp) is refused rather than mixed in.
    `name` labels the arm (e.g. "real", "generated") for plotting several curves.
    """
    if repeats < 1 or not sizes or min(sizes) < 2:
        raise UsageError(f"need repeats >= 1 and sizes >= 2, got repeats={repeats}, sizes={list(sizes)}")
    test_rows, y_test = binary_task(test_df, negative, positive, column)
    if y_test.min(initial=1) == y_test.max(initial=0):
        raise UsageError(f"the test set needs both {negative!r} and {positive!r} rows in {column!r}")
    path = Path(results_csv)
    _check_stamp(path, _stamp(pool, test_df, train_fn))
    done = _load_results(path, seed)
    jobs = [(int(s), r) for s in sorted(set(sizes)) for r in range(repeats)]
    todo = [job for job in jobs if job not in set(zip(done["size"], done["repeat"]))]
    path.parent.mkdir(parents=True, exist_ok=True)

    def fit(job: tuple[int, int]) -> dict:
        size, repeat = job
        s = repeat_seed(seed, repeat)
        subset = draw_subset(pool, size, s, column=column, negative=negative, positive=positive, group=group)
        p = probabilities(train_fn(subset, s), test_rows)
        return {"name": name, "size": size, "repeat": repeat, "seed": s, "n_train": len(subset),
                "n_pos_train": int((subset[column].astype(str) == positive).sum()),
                "n_patients": subset[group].nunique(), "auc": roc_auc_score(y_test, p),
                "loss": log_loss(y_test, p, labels=[0, 1])}

    # fits in `workers` processes (parallel.imap_jobs); the parent appends each row as it arrives
    for row in imap_jobs(todo, fit, workers, progress=progress, desc=f"scaling {name}".strip()):
        pd.DataFrame([row], columns=RESULT_COLUMNS).to_csv(path, mode="a", header=not path.exists(), index=False)
    results = _load_results(path, seed)
    wanted = pd.MultiIndex.from_tuples(jobs, names=["size", "repeat"])
    return results.set_index(["size", "repeat"]).loc[wanted].reset_index()[list(RESULT_COLUMNS)]


def scaling_curves(train_fn: TrainFn, pools: Mapping[str, pd.DataFrame], test_df: pd.DataFrame,
                   sizes: Sequence[int], repeats: int, folder: str | Path, *, prefix: str = "", seed: int = 0,
                   progress: bool = False) -> pd.DataFrame:
    """`scaling_curve` of every named pool (e.g. real, generated), each at the `sizes` it fills class-balanced
    (a generated pool goes on past the real one), into its `results_file` under `folder` (`prefix` + name)."""
    return pd.concat([scaling_curve(train_fn, pool, test_df, feasible_sizes([pool], sizes), repeats,
                                    results_file(folder, prefix + name, train_fn, pool, test_df), name=name,
                                    seed=seed, progress=progress)
                      for name, pool in pools.items()], ignore_index=True)


def results_file(folder: str | Path, name: str, train_fn: TrainFn, pool: pd.DataFrame, test_df: pd.DataFrame) -> Path:
    """`folder/<name>-<key>.csv`, the key naming the pool, test set and recipe: a study whose data or model changed
    starts a new curve instead of being refused by the old one's file (`scaling_curve` never mixes them)."""
    key = hashlib.sha256(json.dumps(_stamp(pool, test_df, train_fn), sort_keys=True).encode()).hexdigest()[:12]
    return Path(folder) / f"{name}-{key}.csv"


def _stamp(pool: pd.DataFrame, test_df: pd.DataFrame, train_fn: TrainFn) -> dict:
    return {"pool": rows_fingerprint(pool), "test": rows_fingerprint(test_df), "recipe": recipe_of(train_fn)}


def _check_stamp(path: Path, stamp: dict) -> None:
    """Write the results file's stamp, or refuse results made from other data or another model."""
    stamp_path = path.with_suffix(".json")
    if path.exists():
        saved = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        if differ := [key for key in stamp if saved.get(key) != stamp[key]]:
            raise UsageError(f"{path} holds results of another {' and '.join(differ)}; write to a new results file, "
                             "or delete it to start again")
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp))


def _load_results(path: Path, seed: int) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=RESULT_COLUMNS)
    results = pd.read_csv(path, dtype={"name": str}, keep_default_na=False)
    expected = results["repeat"].map(lambda r: repeat_seed(seed, int(r)))
    if not (results["seed"] == expected).all():
        raise UsageError(f"{path} holds results of a run with another seed; pass that seed to resume it, "
                         "or write to a new results file")
    return results


def scaling_summary(results: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Mean and t-interval across repeats of AUC and loss, per arm and size (Fig 4e's curves and bands)."""
    rows = []
    for (name, size), g in results.groupby(["name", "size"], sort=True):
        row = {"name": name, "size": size, "repeats": len(g)}
        for metric in ("auc", "loss"):
            mean, lo, hi = mean_ci(g[metric].to_numpy(dtype=float), level)
            row |= {metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi}
        rows.append(row)
    return pd.DataFrame(rows)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student's t interval of the mean over repeats (NaN bounds for a single repeat)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, np.nan, np.nan
    half = float(sps.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def scaling_figure(summary: pd.DataFrame) -> plt.Figure:
    """Fig 4e's layout: test loss (top) and AUC (bottom) against training-set size, one line per arm."""
    fig, axes = plt.subplots(2, 1, figsize=(4.2, 4.6), sharex=True)
    # t-intervals of a few repeats can leave the metric's range; the axes show the range (AUC 0-1, loss >= 0)
    for ax, metric, limits in zip(axes, ("loss", "auc"), ((0.0, None), (0.0, 1.0))):
        for name, g in summary.groupby("name", sort=False):
            color = PALETTE.get(name)
            ax.plot(g["size"], g[metric], marker="o", label=name, color=color)
            ax.fill_between(g["size"], g[f"{metric}_lo"], g[f"{metric}_hi"], alpha=0.25, color=color)
        ax.set(ylabel={"loss": "test loss (cross-entropy)", "auc": "test AUC"}[metric], xscale="log", ylim=limits)
    # the measured sizes as plain numbers: a log axis would label its minor ticks (3x10^1, 4x10^1, ...) over each other
    axes[1].set_xticks(sorted(summary["size"].unique()))
    axes[1].xaxis.set_major_formatter(ticker.ScalarFormatter())
    axes[1].xaxis.set_minor_formatter(ticker.NullFormatter())
    axes[1].tick_params(axis="x", labelrotation=45)
    axes[1].set_xlabel("training images")
    axes[0].legend()
    fig.tight_layout()
    return fig
