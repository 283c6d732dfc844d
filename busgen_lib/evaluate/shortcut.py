"""Shortcut learning from data-acquisition bias (DAB): paper §2.4 and Supplementary §6, after its ref. 29.

The paper assumes generated data, balanced over pathology x device, keeps a
diagnostic model from learning the spurious device-pathology correlation of
real collections, and quantifies "DAB-induced shortcut learning" following
Ong Ly et al. 2024 (ref. 29, npj Digit. Med. 7:124). Two measurements here:

1. A controlled confounding experiment on data whose devices are known (the
   phantom): `confounded_split` builds a training set in which benign images
   come mostly from device group A and malignant ones from group B (phi =
   `strength`), plus class-balanced test sets with the same correlation,
   none, and the reverse. A model that leans on the device scores high on the
   first and low on the last (`shortcut_report`).
2. Ref. 29's estimate, which needs no external data: train the same recipe on
   images whose pixels are shuffled (spatial structure, hence anatomy and
   lesion shape, destroyed; intensity statistics such as gain, dynamic range
   and speckle level kept) and measure its AUC, P_DABIS; then
   P_Est = P_Source - P_DABIS + 0.5 estimates the AUC on unseen acquisition
   settings (`dab_estimate`). Ref. 29 reshuffles at every load; here each
   image gets one fixed permutation written to disk, so any TrainFn can use it.

`balanced_counterpart_plan` is the generated-data arm: the same pathologies
and devices as a confounded training set, every pathology x device cell
equally filled, as a plan table for `diffusion.pipeline.sample_dataset`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import matthews_corrcoef

from busgen_lib.data.augment import prepare
from busgen_lib.data.dataset import derive_seed, load_grayscale
from busgen_lib.data.manifest import resolve
from busgen_lib.diffusion.plan import balanced_cell
from busgen_lib.errors import UsageError
from busgen_lib.evaluate.scaling import mean_ci
from busgen_lib.evaluate.stats import auc_ci, rank_auc
from busgen_lib.evaluate.training import SEED_LIMIT, TrainFn, probabilities
from busgen_lib.evaluate.utility import binary_task
from busgen_lib.parallel import run_jobs

GROUP_COLUMN = "device_group"
TESTS = ("confounded", "deconfounded", "anti-confounded")   # test-set correlation: +strength, 0, -strength


# --------------------------------------------------------------------------- confounded data

def device_groups(df: pd.DataFrame, seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A seeded split of the devices in `df` into two halves (groups A and B)."""
    devices = np.sort(df["device"].astype(str).unique())
    if len(devices) < 2:
        raise UsageError(f"a device shortcut needs at least two devices; the data has {list(devices)}")
    order = devices[np.random.default_rng([seed, len(devices)]).permutation(len(devices))]
    half = len(devices) // 2
    return tuple(sorted(order[:half])), tuple(sorted(order[half:]))


def confounded_split(df: pd.DataFrame, strength: float, seed: int = 0, *,
                     groups: tuple[Sequence[str], Sequence[str]] | None = None, column: str = "pathology",
                     negative: str = "benign", positive: str = "malignant",
                     train_splits: Sequence[str] = ("train",), test_splits: Sequence[str] = ("val", "test"),
                     ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(training set, {"confounded", "deconfounded", "anti-confounded": test set}) with a set device bias.

    Training rows (patients in `train_splits`) are subsampled so that classes
    are balanced and a share (1 + strength) / 2 of `negative` rows come from
    device group A and of `positive` rows from group B: the phi coefficient of
    (label, group) is then `strength` (0 = no bias, 1 = device gives the label).
    The test sets (patients in `test_splits`) are class-balanced with phi =
    +strength, 0 and -strength and one common size (validation patients join
    the test pool by default: three test sets at |phi| = strength need many
    images, and nothing is tuned here). Every set is as large as
    the data allow; rows carry a `device_group` column ("A"/"B"), and each
    set's `.attrs["phi"]` is its realised phi (rounding moves it by < 2 / n).
    """
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"strength is the target phi coefficient in [0, 1], got {strength}")
    a, b = groups if groups is not None else device_groups(df, seed)
    if set(a) & set(b):
        raise UsageError(f"device groups overlap: {sorted(set(a) & set(b))}")
    rows, y = binary_task(df[df["device"].astype(str).isin([*a, *b])], negative, positive, column)
    rows = rows.assign(**{GROUP_COLUMN: np.where(rows["device"].astype(str).isin(a), "A", "B"), "_y": y})
    split = rows["split"].astype(str)
    pools = {"train": rows[split.isin(train_splits)], "test": rows[split.isin(test_splits)]}
    train = _biased_sample(pools["train"], [strength], seed, "training")[0]
    tests = _biased_sample(pools["test"], [strength, 0.0, -strength], derive_seed(seed, 1), "test")
    out = [frame.drop(columns="_y") for frame in (train, *tests)]
    for frame, sample in zip(out, (train, *tests)):
        phi = matthews_corrcoef(sample["_y"], sample[GROUP_COLUMN] == "B")   # phi of a 2x2 table
        frame.attrs = dict(df.attrs) | {"groups": (tuple(a), tuple(b)), "strength": strength, "phi": phi}
    return out[0], dict(zip(TESTS, out[1:]))


def _biased_sample(pool: pd.DataFrame, phis: Sequence[float], seed: int, what: str) -> list[pd.DataFrame]:
    """Class-balanced samples of one common size per class, P(group A | negative) = (1 + phi) / 2 = P(B | positive)."""
    cells = {(label, g): pool[(pool["_y"] == label) & (pool[GROUP_COLUMN] == g)] for label in (0, 1) for g in "AB"}
    shares = [{(0, "A"): (1 + phi) / 2, (0, "B"): (1 - phi) / 2, (1, "A"): (1 - phi) / 2, (1, "B"): (1 + phi) / 2}
              for phi in phis]
    n = min(int(len(cells[c]) / share[c] + 1e-9) for share in shares for c in cells if share[c] > 0)
    if n < 2:
        counts = ", ".join(f"label {label} group {g}: {len(cells[(label, g)])}" for label, g in cells)
        raise UsageError(f"too few {what} images for the requested device bias ({counts}); lower the strength, "
                         "choose device groups with more images, or use a larger dataset")
    samples = []
    for k, share in enumerate(shares):
        rng = np.random.default_rng([seed, k])
        parts = []
        for label in (0, 1):
            major = "A" if label == 0 else "B"
            n_major = int(round(n * share[(label, major)]))
            for g, count in ((major, n_major), ("B" if major == "A" else "A", n - n_major)):
                cell = cells[(label, g)]
                parts.append(cell.iloc[np.sort(rng.choice(len(cell), size=count, replace=False))])
        samples.append(pd.concat(parts))
    return samples


# --------------------------------------------------------------------------- measurements

def shortcut_report(train_fn: TrainFn, train_df: pd.DataFrame, tests: Mapping[str, pd.DataFrame],
                    seeds: Sequence[int], *, column: str = "pathology", negative: str = "benign",
                    positive: str = "malignant", n_boot: int = 1000) -> pd.DataFrame:
    """AUC (bootstrap 95% CI) of a model trained on `train_df` on each test set, one row per (seed, test).

    The shortcut shows as the drop from the "confounded" test (bias as in
    training) to "deconfounded" and "anti-confounded"; `shortcut_summary`
    averages it over seeds.
    """
    labelled = {name: binary_task(df, negative, positive, column) for name, df in tests.items()}

    def fit_and_score(seed: int) -> list[dict]:
        score_fn = train_fn(train_df, int(seed) % SEED_LIMIT)
        rows = []
        for name, (test_rows, y) in labelled.items():
            auc, lo, hi = auc_ci(y, probabilities(score_fn, test_rows), n_boot=n_boot, seed=int(seed))
            rows.append({"seed": seed, "test": name, "n": len(y), "n_pos": int(y.sum()),
                         "auc": auc, "ci_lo": lo, "ci_hi": hi})
        return rows

    # the seeds' fits are independent: one worker process each (parallel.run_jobs)
    return pd.DataFrame([row for rows in run_jobs(list(seeds), fit_and_score) for row in rows])


def shortcut_summary(report: pd.DataFrame, reference: str = "confounded", level: float = 0.95) -> pd.DataFrame:
    """Per test set: mean AUC over seeds, and its drop from `reference` (paired by seed), with t-intervals."""
    wide = report.pivot(index="seed", columns="test", values="auc")
    if reference not in wide:
        raise UsageError(f"no {reference!r} test in the report; it has {', '.join(wide.columns)}")
    rows = []
    for test in wide.columns:
        auc, auc_lo, auc_hi = mean_ci(wide[test].to_numpy(), level)
        drop, drop_lo, drop_hi = mean_ci((wide[reference] - wide[test]).to_numpy(), level)
        rows.append({"test": test, "seeds": len(wide), "auc": auc, "auc_lo": auc_lo, "auc_hi": auc_hi,
                     f"drop_from_{reference}": drop, "drop_lo": drop_lo, "drop_hi": drop_hi})
    return pd.DataFrame(rows)


def pixel_shuffled(df: pd.DataFrame, out_dir: str | Path, size: int, seed: int = 0) -> pd.DataFrame:
    """Copies of the rows' images at `size` px with their pixels randomly permuted (ref. 29's transform).

    Images are first resized as the data layer does for evaluation, so the
    permutation acts on what the model would see. One permutation per image,
    seeded by (seed, image path). Returns the rows pointing at the copies
    (absolute paths; masks dropped, boxes kept only so the manifest stays valid).
    """
    out = Path(out_dir) / "images"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(df)):
        source = resolve(df, "image", i)
        image, _ = prepare(load_grayscale(source), torch.zeros(0, 4), size)
        pixels = image[0].numpy().ravel()
        rng = np.random.default_rng(derive_seed(seed, zlib.crc32(str(df["image"].iloc[i]).encode())))
        shuffled = pixels[rng.permutation(pixels.size)].reshape(size, size)
        target = out / f"{i:06d}.png"
        Image.fromarray(np.round(shuffled * 255.0).astype(np.uint8)).save(target)
        paths.append(str(target.resolve()))
    copy = df.assign(image=paths, **({"mask": ""} if "mask" in df.columns else {}))
    copy.attrs = dict(df.attrs)
    return copy


def dab_estimate(train_fn: TrainFn, train_df: pd.DataFrame, test_df: pd.DataFrame, seeds: Sequence[int],
                 workdir: str | Path, size: int, *, column: str = "pathology", negative: str = "benign",
                 positive: str = "malignant") -> pd.DataFrame:
    """Ref. 29's bias-corrected estimate per seed: P_Source, P_DABIS and P_Est = P_Source - P_DABIS + 0.5.

    P_Source: AUC on `test_df` (an internal test set) of the model trained on
    `train_df`; P_DABIS: the same recipe trained and tested on pixel-shuffled
    copies. P_DABIS far above 0.5 means the labels are predictable from
    acquisition statistics alone; P_Est is ref. 29's estimate of the AUC
    where those statistics no longer match the labels.
    """
    test_rows, y = binary_task(test_df, negative, positive, column)
    shuffled_train = pixel_shuffled(train_df, Path(workdir) / "train", size)
    shuffled_test = pixel_shuffled(test_rows, Path(workdir) / "test", size)

    def estimate(seed: int) -> dict:
        s = int(seed) % SEED_LIMIT
        p_source = rank_auc(y, probabilities(train_fn(train_df, s), test_rows))
        p_dabis = rank_auc(y, probabilities(train_fn(shuffled_train, s), shuffled_test))
        return {"seed": seed, "p_source": p_source, "p_dabis": p_dabis, "p_est": p_source - p_dabis + 0.5}

    # one worker process per seed (parallel.run_jobs), as in shortcut_report
    return pd.DataFrame(run_jobs(list(seeds), estimate))


def remedy_study(train_fn: TrainFn, real_df: pd.DataFrame, generated_df: pd.DataFrame, strength: float,
                 seeds: Sequence[int], seed: int = 0, n_boot: int = 1000,
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """The shortcut with and without generated data (Supplementary §6): (summary, biased training set, tests).

    Two training sets of one size, scored on the same real confounded,
    deconfounded and anti-confounded tests: real images whose device group
    predicts the label (phi = `strength`), and generated images of the same
    device groups, balanced over pathology x device as BUSGen samples them.
    A model that leans on the device drops from the first test to the last; the
    summary gives that drop per training set, paired by seed.
    """
    biased, tests = confounded_split(real_df, strength, seed)
    a, b = biased.attrs["groups"]
    balanced = generated_df[generated_df["device"].astype(str).isin([*a, *b])]
    if len(balanced) < len(biased):
        raise UsageError(f"the generated set has {len(balanced)} images of the biased set's {len(a) + len(b)} devices, "
                         f"fewer than its {len(biased)}; generate more images")
    balanced = balanced.sample(n=len(biased), random_state=seed)
    balanced = balanced.assign(**{GROUP_COLUMN: np.where(balanced["device"].astype(str).isin(a), "A", "B")})
    arms = {"real, device-confounded": biased, "generated, balanced": balanced}
    summary = pd.concat({name: shortcut_summary(shortcut_report(train_fn, df, tests, seeds, n_boot=n_boot)).set_index("test")
                         for name, df in arms.items()}, names=["training set"])
    return summary, biased, tests


# --------------------------------------------------------------------------- the generated-data arm

def balanced_counterpart_plan(train_df: pd.DataFrame, n: int | None = None, *, negative: str = "benign",
                              positive: str = "malignant") -> pd.DataFrame:
    """A generation plan table (pathology, device) over the devices of `train_df`, every cell equally filled.

    `n` defaults to the size of `train_df`. Write it with `to_csv(path,
    index=False)` and pass the path as `plan=` to `sample_dataset`; lesion
    boxes then come from the model's box prior.
    """
    devices = sorted(train_df["device"].astype(str).unique())
    n = len(train_df) if n is None else n
    if n < 1:
        raise UsageError(f"n must be a positive number of images, got {n}")
    cells = [balanced_cell(i, 2, len(devices)) for i in range(n)]
    return pd.DataFrame({"pathology": [(negative, positive)[p] for p, _ in cells],
                         "device": [devices[d] for _, d in cells]})
