"""Leave-one-dataset-out: do diagnostic models trained on generated data generalise better than on real data?

The paper's claim (§2.5, Fig 4f–g): "BUS-DM, trained only on generated data,
enjoyed better generalization ability than baseline models trained on real
data". On the public sets it is tested like this: BUSGen is
pretrained on all real sets but one, with the source set as the device
condition; a category- and device-balanced benign/malignant set is generated;
the same classifier recipe is trained, with several seeds, on the real training
images, on the generated images and on both; each is scored on the internal
test split of the pooled sets and on the held-out set (external). The quantity
of interest is each arm's drop from internal to external AUC.

Models are passed in as a `TrainFn` (training rows, seed → scoring function),
so the study runs with BUS-DM, Baseline-CLIP or any user model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image
from scipy import stats as sps
from sklearn.metrics import roc_auc_score, roc_curve

from busgen_lib import plotting
from busgen_lib.atomic import atomic_path
from busgen_lib.data import catalog
from busgen_lib.data.manifest import read_manifest, resolve, rows_fingerprint
from busgen_lib.data.schema import parse_boxes
from busgen_lib.evaluate.scaling import mean_ci
from busgen_lib.evaluate.stats import auc_ci, delong_test
from busgen_lib.evaluate.training import TrainFn, probabilities, recipe_of
from busgen_lib.parallel import run_jobs

TASK = ("benign", "malignant")  # negative, positive
REAL, GENERATED, BOTH = "real", "generated", "generated + real"


# ------------------------------------------------------------------ the design

def others(held_out: str) -> tuple[str, ...]:
    """The real sets a leave-`held_out`-out generator is trained on."""
    if held_out not in catalog.REAL_DATASETS:
        raise ValueError(f"unknown held-out set {held_out!r}; choose one of {', '.join(catalog.REAL_DATASETS)}")
    return tuple(name for name in catalog.REAL_DATASETS if name != held_out)


def absolute(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with absolute image/mask paths, so tables from different folders can be concatenated."""
    out = df.copy()
    for column in ("image", "mask"):
        if column in out:
            out[column] = ["" if not str(v) else str(resolve(df, column, i)) for i, v in enumerate(df[column])]
    out.attrs = dict(df.attrs) | {"root": "/"}  # paths are absolute: any root resolves them
    return out


def combine(*frames: pd.DataFrame) -> pd.DataFrame:
    """Rows of several `absolute` tables as one training set (pandas drops differing attrs on concat)."""
    out = pd.concat(frames, ignore_index=True)
    out.attrs = {"root": "/"}
    return out


def task_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Benign and malignant rows only (normal images have no diagnosis to predict)."""
    return df[df["pathology"].astype(str).isin(TASK)].reset_index(drop=True)


def labels(df: pd.DataFrame) -> np.ndarray:
    return (df["pathology"].astype(str) == TASK[1]).to_numpy(np.int64)


def design(pool: str | Path, held_out_manifest: str | Path, generated: str | Path | pd.DataFrame | None,
           ) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Training arms (real, generated, generated + real) and test sets (internal, external).

    `generated` is a sampling folder's manifest or its rows (e.g. one lever's set, `levers.lever_sets`).

    Real training rows are the pool's train and val splits (model selection
    happens by cross-validation inside them); the internal test is the pool's
    test split, patient-disjoint from training; the external test is every
    benign or malignant image of the held-out set.
    """
    real_df = absolute(read_manifest(pool))
    if generated is not None and not isinstance(generated, pd.DataFrame):
        generated = absolute(read_manifest(generated))
    gen = None if generated is None else task_rows(generated)
    tests = {"internal": task_rows(real_df[real_df["split"].astype(str) == "test"]),
             "external": task_rows(absolute(read_manifest(held_out_manifest)))}
    return _arms(task_rows(real_df[real_df["split"].astype(str).isin(["train", "val"])]), gen), tests


def device_design(real_df: pd.DataFrame, generated_df: pd.DataFrame, external_devices: Sequence[str],
                  ) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """The same arms and tests within one dataset whose held-out devices play the external hospitals (Fig 4f–g).

    Training (real train/val patients, generated images) and the internal test
    use the other devices; the external test is every image of the held-out
    devices whose patient never appears in training.
    """
    device = real_df["device"].astype(str)
    if missing := sorted(set(external_devices) - set(device)):
        raise ValueError(f"external devices {missing} are not in the data")
    inside = real_df[~device.isin(external_devices)]
    real = task_rows(inside[inside["split"].astype(str).isin(["train", "val"])])
    gen = task_rows(generated_df[~generated_df["device"].astype(str).isin(external_devices)])
    outside = real_df[device.isin(external_devices) & ~real_df["patient_id"].isin(set(real["patient_id"]))]
    tests = {"internal": task_rows(inside[inside["split"].astype(str) == "test"]), "external": task_rows(outside)}
    return _arms(real, gen), tests


def external_devices(df: pd.DataFrame, n: int, seed: int = 0) -> list[str]:
    """`n` devices of `df` drawn at random (seeded): the phantom's stand-in for other hospitals."""
    devices = np.sort(df["device"].astype(str).unique())
    if not 0 < n < len(devices):
        raise ValueError(f"cannot hold out {n} of {len(devices)} devices; keep at least one for training")
    return sorted(np.random.default_rng([seed, n]).choice(devices, size=n, replace=False).tolist())


def _arms(real: pd.DataFrame, generated: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    arms = {REAL: real}
    if generated is not None:
        arms[GENERATED] = generated
        arms[BOTH] = combine(real, generated)
    return arms


# ------------------------------------------------------------------ scoring, resumable

def digest(df: pd.DataFrame) -> str:
    """A short fingerprint of which images with which labels a table holds (for resumable results)."""
    return rows_fingerprint(df, ("image", "pathology", "boxes"))[:16]


def score_arms(arms: Mapping[str, pd.DataFrame], tests: Mapping[str, pd.DataFrame], train_fn: TrainFn,
               seeds: Sequence[int], out_dir: str | Path, *, model_name: str = "model", progress: bool = True,
               workers: int | None = None) -> pd.DataFrame:
    """Train `train_fn` on every arm with every seed and score every test set; one row per (arm, seed, test image).

    Each (arm, seed) is written to `out_dir/<model_name>/<arm>/seed<k>.csv` as it
    finishes, stamped with the digests of its training and test rows and the
    TrainFn's recipe, so a rerun after a kill trains only what is missing and
    never reuses scores of other data or another model. Missing fits run in
    `workers` processes (`parallel.run_jobs`; default: one per core); a TrainFn's
    `prepare(rows)` (the cross-validated choice) runs first, once per arm.
    """
    out_dir = Path(out_dir) / model_name
    stamp = {"tests": {name: digest(df) for name, df in tests.items()}, "recipe": recipe_of(train_fn)}

    def files(job: tuple[str, int]) -> tuple[Path, Path, dict]:
        arm, seed = job
        path = out_dir / arm.replace(" ", "") / f"seed{seed}.csv"
        return path, path.with_suffix(".json"), stamp | {"train": digest(arms[arm]), "seed": int(seed)}

    def saved(job: tuple[str, int]) -> pd.DataFrame | None:
        path, stamp_path, job_stamp = files(job)
        if path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == job_stamp:
            return pd.read_csv(path)
        return None

    def fit_and_score(job: tuple[str, int]) -> pd.DataFrame:
        (arm, seed), (path, stamp_path, job_stamp) = job, files(job)
        score = train_fn(arms[arm], int(seed))
        parts = [pd.DataFrame({"arm": arm, "seed": int(seed), "test": name, "row": np.arange(len(df)),
                               "image": df["image"].astype(str).to_numpy(), "y": labels(df),
                               "score": probabilities(score, df)})
                 for name, df in tests.items()]
        frame = pd.concat(parts, ignore_index=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
        stamp_path.write_text(json.dumps(job_stamp))
        return frame

    frames = {job: saved(job) for job in [(arm, seed) for arm in arms for seed in seeds]}
    pending = [job for job, frame in frames.items() if frame is None]
    for arm in dict.fromkeys(arm for arm, _ in pending):
        getattr(train_fn, "prepare", lambda rows: None)(arms[arm])  # before the seeds fork: computed once
    frames |= dict(zip(pending, run_jobs(pending, fit_and_score, workers, progress=progress,
                                         desc=f"{model_name}: arms x seeds")))
    return pd.concat(frames.values(), ignore_index=True)


# ------------------------------------------------------------------ summaries

def auc_by_seed(scores: pd.DataFrame) -> pd.DataFrame:
    """AUC of every (arm, test, seed) — the unit of replication across training runs."""
    rows = [{"arm": arm, "test": test, "seed": seed, "auc": roc_auc_score(g["y"], g["score"])}
            for (arm, test, seed), g in scores.groupby(["arm", "test", "seed"], sort=False)]
    return pd.DataFrame(rows)


def drop_table(per_seed: pd.DataFrame, reference: str = REAL) -> pd.DataFrame:
    """Internal AUC, external AUC and the drop between them per arm, mean over seeds with t-intervals.

    Each arm's drop is compared with the reference arm's drop seed by seed
    (arms share seeds): paired t-test and Wilcoxon signed-rank across seeds.
    A smaller drop is the paper's "better generalisation".
    """
    wide = per_seed.pivot_table(index=["arm", "seed"], columns="test", values="auc").reset_index()
    wide["drop"] = wide["internal"] - wide["external"]
    ref = wide[wide["arm"] == reference].set_index("seed")["drop"]
    rows = []
    for arm, g in wide.groupby("arm", sort=False):
        row = {"arm": arm, "seeds": len(g)}
        for column in ("internal", "external", "drop"):
            values = g[column].to_numpy()
            mean, lo, hi = mean_ci(values)
            row |= {column: mean, f"{column}_sd": values.std(ddof=1) if len(values) > 1 else float("nan"),
                    f"{column}_lo": lo, f"{column}_hi": hi}
        if arm != reference:
            diff = g.set_index("seed")["drop"].sub(ref).dropna().to_numpy()
            row["drop_minus_reference"] = diff.mean() if len(diff) else float("nan")
            enough = len(diff) > 1 and np.any(diff != 0)
            row["paired_t_p"] = sps.ttest_1samp(diff, 0.0).pvalue if enough else float("nan")
            row["wilcoxon_p"] = sps.wilcoxon(diff).pvalue if enough else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def ensemble_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Per test image, the mean score over seeds of each arm (a seed ensemble), for ROC curves and DeLong."""
    return scores.groupby(["arm", "test", "row"], sort=False).agg(y=("y", "first"), score=("score", "mean")).reset_index()


def ensemble_table(scores: pd.DataFrame, reference: str = REAL, n_boot: int = 1000) -> pd.DataFrame:
    """AUC of each arm's seed ensemble per test set, with its bootstrap 95% CI (§4.5) and DeLong's P vs `reference`.

    DeLong's test here covers test-set noise for these particular ensembles;
    the across-seed tests of `drop_table` cover training noise.
    """
    rows = []
    for test, t in ensemble_scores(scores).groupby("test", sort=False):
        ref = t[t["arm"] == reference].sort_values("row")
        for arm, g in t.groupby("arm", sort=False):
            g = g.sort_values("row")
            y, s = g["y"].to_numpy(), g["score"].to_numpy()
            auc, lo, hi = auc_ci(y, s, n_boot=n_boot)
            row = {"test": test, "arm": arm, "n": len(y), "n_malignant": int(y.sum()), "auc": auc, "ci_lo": lo, "ci_hi": hi}
            if arm != reference and len(ref):
                row[f"delong_p_vs_{reference}"] = delong_test(y, s, ref["score"].to_numpy(), degenerate="permutation")[3]
            rows.append(row)
    return pd.DataFrame(rows)


def drop_figure(per_seed: Mapping[str, pd.DataFrame]) -> plt.Figure:
    """One panel per held-out set: each arm's internal → external AUC (mean over seeds, 95% t-interval)."""
    fig, axes = plt.subplots(1, len(per_seed), figsize=(3.6 * len(per_seed), 2.8), squeeze=False, sharey=True)
    for ax, (held, table) in zip(axes[0], per_seed.items()):
        for k, (arm, g) in enumerate(table.groupby("arm", sort=False)):
            stats = [mean_ci(g.loc[g["test"] == test, "auc"].to_numpy()) for test in ("internal", "external")]
            means = [s[0] for s in stats]
            errors = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
            x = np.array([0, 1]) + (k - 1) * 0.04
            ax.errorbar(x, means, yerr=np.nan_to_num(errors), marker="o", capsize=3, label=arm)
        ax.set(xticks=[0, 1], xticklabels=["internal", f"external\n({held})"], xlim=(-0.3, 1.3), ylim=(0.0, 1.0),
               title=f"{held} held out", ylabel="AUC")   # t-intervals of a few seeds may leave 0-1
    axes[0, -1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return fig


def roc_figure(scores: pd.DataFrame, paper: Mapping[str, float] | None = None) -> plt.Figure:
    """ROC curve of each arm's seed ensemble, its AUC with bootstrap 95% CI and, where given, the paper's AUC."""
    fig, ax = plt.subplots(figsize=(3.2, 3.0))
    for arm, g in ensemble_scores(scores).groupby("arm", sort=False):
        fpr, tpr, _ = roc_curve(g["y"], g["score"])
        auc, lo, hi = auc_ci(g["y"].to_numpy(), g["score"].to_numpy())
        note = f"; paper {paper[arm]:.3f}" if paper and arm in paper else ""
        ax.plot(fpr, tpr, label=f"{arm}: {auc:.3f} ({lo:.3f}–{hi:.3f}){note}")
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls="--")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", aspect="equal")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def example_figure(real: pd.DataFrame, generated: pd.DataFrame, seed: int = 0) -> plt.Figure:
    """Real and generated images side by side, one per (source, pathology) row and device column, boxes outlined."""
    cells, boxes = {}, {}
    for source, df in (("real", real), ("generated", generated)):
        for (pathology, device), g in task_rows(df).groupby(["pathology", "device"]):
            row = g.sample(n=1, random_state=seed).iloc[0]
            key = (f"{source} {pathology}", str(device))
            cells[key] = np.asarray(Image.open(row["image"]).convert("L"))
            boxes[key] = parse_boxes(row["boxes"])
    rows = [f"{s} {p}" for s in ("real", "generated") for p in TASK]
    return plotting.image_grid(cells, rows, sorted({k[1] for k in cells}), boxes=boxes)
