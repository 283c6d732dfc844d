"""Leave-one-dataset-out design and its summaries (experiments/generalisation.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from busgen_lib.data.manifest import read_manifest
from busgen_lib.experiments import generalisation as g
from manifest_fixtures import SHARED_DATASETS


def _per_seed(arm: str, internal: list[float], external: list[float]) -> pd.DataFrame:
    rows = [{"arm": arm, "test": test, "seed": seed, "auc": auc}
            for test, values in (("internal", internal), ("external", external)) for seed, auc in enumerate(values)]
    return pd.DataFrame(rows)


def test_drop_table_matches_scipy_paired_tests_and_t_intervals():
    real = _per_seed(g.REAL, [0.90, 0.80, 0.85, 0.88], [0.70, 0.62, 0.66, 0.61])
    gen = _per_seed(g.GENERATED, [0.80, 0.81, 0.79, 0.83], [0.75, 0.70, 0.78, 0.74])
    table = g.drop_table(pd.concat([real, gen]), reference=g.REAL).set_index("arm")

    drop_real = np.array([0.20, 0.18, 0.19, 0.27])
    drop_gen = np.array([0.05, 0.11, 0.01, 0.09])
    assert table.loc[g.REAL, "drop"] == pytest.approx(drop_real.mean())
    assert table.loc[g.GENERATED, "drop"] == pytest.approx(drop_gen.mean())
    lo, hi = sps.t.interval(0.95, len(drop_gen) - 1, loc=drop_gen.mean(), scale=sps.sem(drop_gen))
    assert (table.loc[g.GENERATED, "drop_lo"], table.loc[g.GENERATED, "drop_hi"]) == pytest.approx((lo, hi))
    assert table.loc[g.GENERATED, "drop_minus_reference"] == pytest.approx((drop_gen - drop_real).mean())
    assert table.loc[g.GENERATED, "paired_t_p"] == pytest.approx(sps.ttest_rel(drop_gen, drop_real).pvalue)
    assert table.loc[g.GENERATED, "wilcoxon_p"] == pytest.approx(sps.wilcoxon(drop_gen - drop_real).pvalue)
    assert np.isnan(table.loc[g.REAL, "drop_minus_reference"])


def _scores_frame(n: int = 40, seed: int = 0) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    rng = np.random.default_rng(seed)
    tests = {name: pd.DataFrame({"image": [f"{name}{i}.png" for i in range(n)],
                                 "pathology": np.where(np.arange(n) % 3 == 0, "malignant", "benign"),
                                 "signal": rng.normal(size=n)}) for name in ("internal", "external")}
    for df in tests.values():
        df["signal"] += 1.5 * (df["pathology"] == "malignant")
    return rng, tests


def test_score_arms_trains_each_arm_and_seed_once_and_resumes(tmp_path):
    rng, tests = _scores_frame()
    arms = {g.REAL: pd.DataFrame({"image": ["a", "b"], "pathology": ["benign", "malignant"]}),
            g.GENERATED: pd.DataFrame({"image": ["c", "d"], "pathology": ["benign", "malignant"]})}
    calls = []

    def train_fn(df: pd.DataFrame, seed: int):
        calls.append((tuple(df["image"]), seed))
        noise = np.random.default_rng(seed).normal(scale=0.5, size=1000)
        return lambda test: 1.0 / (1.0 + np.exp(-(test["signal"].to_numpy() + noise[: len(test)])))

    scores = g.score_arms(arms, tests, train_fn, [0, 1, 2], tmp_path, progress=False, workers=1)
    assert len(calls) == 6 and len(scores) == 6 * 2 * 40
    again = g.score_arms(arms, tests, train_fn, [0, 1, 2], tmp_path, progress=False, workers=1)
    assert len(calls) == 6  # everything was on disk
    pd.testing.assert_frame_equal(scores.reset_index(drop=True), again.reset_index(drop=True))

    arms[g.GENERATED] = pd.DataFrame({"image": ["c", "e"], "pathology": ["benign", "malignant"]})
    g.score_arms(arms, tests, train_fn, [0, 1, 2], tmp_path, progress=False, workers=1)
    assert len(calls) == 9 and {c[0] for c in calls[6:]} == {("c", "e")}  # only the changed arm retrains
    train_fn.recipe = {"model": "another backbone"}
    g.score_arms(arms, tests, train_fn, [0], tmp_path, progress=False, workers=1)
    assert len(calls) == 11  # another model retrains every arm

    per_seed = g.auc_by_seed(scores)
    one = scores[(scores["arm"] == g.REAL) & (scores["test"] == "external") & (scores["seed"] == 1)]
    auc = per_seed.query("arm == @g.REAL and test == 'external' and seed == 1")["auc"].item()
    assert auc == pytest.approx(roc_auc_score(one["y"], one["score"]))

    table = g.ensemble_table(scores, n_boot=200)
    row = table[(table["arm"] == g.GENERATED) & (table["test"] == "internal")].iloc[0]
    ens = scores[(scores["arm"] == g.GENERATED) & (scores["test"] == "internal")].groupby("row")["score"].mean()
    y = tests["internal"]["pathology"].eq("malignant").to_numpy()
    assert row["auc"] == pytest.approx(roc_auc_score(y, ens.to_numpy()))
    assert row["ci_lo"] < row["auc"] < row["ci_hi"]
    assert 0.0 <= row[f"delong_p_vs_{g.REAL}"] <= 1.0 and row["n_malignant"] == y.sum()


def test_score_arms_in_two_processes_writes_what_one_process_writes(tmp_path):
    """Forked single-thread workers (after the parent used torch's thread pool) give the serial run's scores and
    files; the arm-wide `prepare` runs once per arm in the parent, before the seeds fork."""
    import os
    import time

    import torch

    _, tests = _scores_frame()
    arms = {g.REAL: pd.DataFrame({"image": ["a", "b"], "pathology": ["benign", "malignant"]}),
            g.GENERATED: pd.DataFrame({"image": ["c", "d"], "pathology": ["benign", "malignant"]})}
    prepared, parent = [], os.getpid()
    torch.set_num_threads(2)
    torch.randn(256, 256) @ torch.randn(256, 256)  # the parent's OpenMP pool exists when the children fork

    def train_fn(df: pd.DataFrame, seed: int):
        (tmp_path / "pids").mkdir(exist_ok=True)
        (tmp_path / "pids" / str(os.getpid())).touch()
        time.sleep(0.2)  # long enough that both workers take jobs
        torch.manual_seed(seed)
        shift = torch.nn.Linear(1, 1)(torch.ones(1, 1)).item() + len(df["image"].iloc[0])
        return lambda test: 1.0 / (1.0 + np.exp(-(test["signal"].to_numpy() + shift)))

    train_fn.prepare = lambda rows: prepared.append((tuple(rows["image"]), os.getpid()))
    serial = g.score_arms(arms, tests, train_fn, [0, 1, 2], tmp_path / "one", progress=False, workers=1)
    assert [pid for _, pid in prepared] == [parent, parent]
    (tmp_path / "pids" / str(parent)).unlink()
    prepared.clear()
    parallel = g.score_arms(arms, tests, train_fn, [0, 1, 2], tmp_path / "two", progress=False, workers=2)
    pd.testing.assert_frame_equal(parallel, serial)
    assert prepared == [(("a", "b"), parent), (("c", "d"), parent)]
    workers = {int(p.name) for p in (tmp_path / "pids").iterdir()}
    assert len(workers) == 2 and parent not in workers
    files = lambda root: {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_jobs_started_inside_a_worker_run_in_that_worker():
    """A pool's workers are daemons, which may not fork: a fit that cross-validates runs its folds in line."""
    import os

    from busgen_lib.parallel import run_jobs

    def outer(job: int) -> tuple[int, set[int]]:
        inner = run_jobs([0, 1, 2], lambda _: os.getpid(), workers=2)
        return os.getpid(), set(inner)

    results = run_jobs([0, 1], outer, workers=2)
    assert all(inner == {pid} for pid, inner in results) and os.getpid() not in {pid for pid, _ in results}


def test_design_keeps_patients_apart_and_uses_only_benign_and_malignant(tiny_phantom, tmp_path):
    df = read_manifest(tiny_phantom)
    arms, tests = g.design(tiny_phantom, tiny_phantom, generated=tiny_phantom)
    assert set(arms) == {g.REAL, g.GENERATED, g.BOTH}
    for frame in (*arms.values(), *tests.values()):
        assert set(frame["pathology"]) <= set(g.TASK)
    train_patients = set(arms[g.REAL]["patient_id"])
    assert train_patients.isdisjoint(set(tests["internal"]["patient_id"]))
    expected = df[df["split"].isin(["train", "val"]) & df["pathology"].isin(g.TASK)]
    assert len(arms[g.REAL]) == len(expected)
    assert len(arms[g.BOTH]) == len(arms[g.REAL]) + len(arms[g.GENERATED])
    assert all(str(p).startswith("/") for p in arms[g.BOTH]["image"])  # concatenable across folders


def test_device_design_holds_devices_and_their_patients_out_of_training(tiny_phantom):
    df = g.absolute(read_manifest(tiny_phantom))
    held = g.external_devices(df, 2, seed=1)
    assert held == g.external_devices(df, 2, seed=1) and len(set(held)) == 2
    arms, tests = g.device_design(df, df, held)
    for arm in arms.values():
        assert not set(arm["device"]) & set(held)
    assert set(tests["external"]["device"]) <= set(held) and not set(tests["internal"]["device"]) & set(held)
    assert set(tests["external"]["patient_id"]).isdisjoint(arms[g.REAL]["patient_id"])
    assert set(tests["internal"]["patient_id"]).isdisjoint(arms[g.REAL]["patient_id"])
    # every benign/malignant image of a held-out device is external unless its patient trains
    train_patients = set(arms[g.REAL]["patient_id"])
    expected = df[df["device"].isin(held) & df["pathology"].isin(g.TASK) & ~df["patient_id"].isin(train_patients)]
    assert len(tests["external"]) == len(expected)
    with pytest.raises(ValueError, match="not in the data"):
        g.device_design(df, df, ["no such device"])
    with pytest.raises(ValueError, match="keep at least one"):
        g.external_devices(df, df["device"].nunique(), seed=0)


def test_others_refuses_an_unknown_held_out_set():
    assert g.others("busi") == ("bus_uclm", "breast_lesions_usg")
    with pytest.raises(ValueError, match="unknown held-out set"):
        g.others("bus_bra")


@pytest.mark.skipif(not (SHARED_DATASETS / "bus_uclm" / "manifest.csv").exists(), reason="shared datasets absent")
def test_real_pool_labels_each_set_as_its_device_and_keeps_every_row(tmp_path):
    from busgen_lib.data import catalog

    pool = read_manifest(catalog.real_pool(SHARED_DATASETS, tmp_path, ("bus_uclm", "breast_lesions_usg")))
    parts = {name: read_manifest(path) for name, path in catalog.real_datasets(SHARED_DATASETS, tmp_path).items()
             if name in ("bus_uclm", "breast_lesions_usg")}
    assert pool["device"].value_counts().to_dict() == {name: len(df) for name, df in parts.items()}
    assert sorted(pool["image"].map(lambda p: p.rsplit("/", 1)[-1])) == sorted(
        p.rsplit("/", 1)[-1] for df in parts.values() for p in df["image"])
    assert catalog.real_pool(SHARED_DATASETS, tmp_path, ("breast_lesions_usg", "bus_uclm")).name == \
        "pool_breast_lesions_usg+bus_uclm.csv"  # order of the names does not make another pool
