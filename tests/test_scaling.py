"""Data-scaling curves (Fig 4e): patient-grouped class-balanced subsets, metrics, resumption, summary."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import log_loss, roc_auc_score

from busgen_lib.errors import UsageError
from busgen_lib.evaluate.scaling import (draw_subset, feasible_sizes, repeat_seed, results_file, scaling_curve,
                                         scaling_curves, scaling_summary)


def _pool(n_patients=60, seed=0) -> pd.DataFrame:
    """Patients with 1-5 images each, one pathology per patient, and a label-bearing feature x."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        pathology = ["benign", "malignant", "normal"][i % 3]
        for v in range(int(rng.integers(1, 6))):
            rows.append({"patient_id": f"P{i:03d}", "image": f"P{i:03d}_{v}.png", "pathology": pathology,
                         "x": rng.normal(1.0 if pathology == "malignant" else 0.0)})
    return pd.DataFrame(rows)


def _sigmoid_of_x(train: pd.DataFrame, seed: int):
    return lambda rows: 1.0 / (1.0 + np.exp(-rows["x"].to_numpy()))


def test_subset_is_sized_balanced_and_patient_grouped():
    pool = _pool()
    sub = draw_subset(pool, 21, seed=3)
    assert len(sub) == 21 and sub.image.is_unique
    assert sub.pathology.value_counts().to_dict() == {"benign": 11, "malignant": 10}
    for _, cls in sub.groupby("pathology"):
        taken = cls.groupby("patient_id").size()
        whole = pool[pool.patient_id.isin(taken.index)].groupby("patient_id").size()
        assert (taken < whole[taken.index]).sum() <= 1   # only the last patient of a class may be cut


def test_subsets_repeat_with_the_seed_differ_across_seeds_and_nest_across_sizes():
    pool = _pool()
    a, b, c = draw_subset(pool, 20, 1), draw_subset(pool, 20, 1), draw_subset(pool, 20, 2)
    assert list(a.image) == list(b.image)
    assert set(a.image) != set(c.image)
    assert set(draw_subset(pool, 12, 1).image) < set(a.image)


def test_too_large_a_subset_is_refused_with_counts():
    pool = _pool(n_patients=6)
    n_benign = (pool.pathology == "benign").sum()
    with pytest.raises(UsageError, match=f"the pool has {n_benign} 'benign' images .* subset of 200 needs 100"):
        draw_subset(pool, 200, 0)


def test_curve_rows_record_sklearn_auc_and_log_loss_on_the_test_set(tmp_path):
    pool, test = _pool(), _pool(n_patients=30, seed=9)
    out = scaling_curve(_sigmoid_of_x, pool, test, [4, 10], 2, tmp_path / "r.csv", name="real", progress=False)
    rows = test[test.pathology != "normal"]
    y, p = (rows.pathology == "malignant").to_numpy().astype(int), 1 / (1 + np.exp(-rows.x.to_numpy()))
    assert out.auc.to_numpy() == pytest.approx(roc_auc_score(y, p))
    assert out.loss.to_numpy() == pytest.approx(log_loss(y, p))
    assert list(zip(out["size"], out.repeat)) == [(4, 0), (4, 1), (10, 0), (10, 1)]
    assert (out.n_train == out["size"]).all() and (out.n_pos_train == out["size"] // 2).all()
    assert (out.name == "real").all() and list(out.seed) == [repeat_seed(0, r) for r in (0, 1, 0, 1)]


def test_a_killed_run_resumes_without_redoing_finished_fits(tmp_path):
    pool, test, path = _pool(), _pool(n_patients=30, seed=9), tmp_path / "r.csv"
    seen = []

    def dies_after_three(train, seed):
        if len(seen) == 3:
            raise KeyboardInterrupt("killed")
        seen.append((len(train), seed, tuple(train.image)))
        return _sigmoid_of_x(train, seed)

    with pytest.raises(KeyboardInterrupt):
        scaling_curve(dies_after_three, pool, test, [4, 8, 12], 2, path, progress=False, workers=1)
    assert len(pd.read_csv(path)) == 3
    resumed = []

    def counting(train, seed):
        resumed.append((len(train), seed, tuple(train.image)))
        return _sigmoid_of_x(train, seed)

    out = scaling_curve(counting, pool, test, [4, 8, 12], 2, path, progress=False, workers=1)
    assert len(resumed) == 3 and not set(resumed) & set(seen)
    fresh = []
    scaling_curve(lambda t, s: fresh.append((len(t), s, tuple(t.image))) or _sigmoid_of_x(t, s),
                  pool, test, [4, 8, 12], 2, tmp_path / "fresh.csv", progress=False, workers=1)
    assert fresh == seen + resumed   # the same fits, in the same order, as an uninterrupted run
    assert len(out) == 6 and len(pd.read_csv(path)) == 6
    with pytest.raises(UsageError, match="another seed"):
        scaling_curve(counting, pool, test, [4], 1, path, seed=5, progress=False, workers=1)


def test_a_curve_in_two_processes_writes_the_rows_one_process_writes(tmp_path):
    pool, test = _pool(), _pool(n_patients=30, seed=9)
    serial = scaling_curve(_sigmoid_of_x, pool, test, [4, 8, 12], 2, tmp_path / "one.csv", progress=False, workers=1)
    parallel = scaling_curve(_sigmoid_of_x, pool, test, [4, 8, 12], 2, tmp_path / "two.csv", progress=False,
                             workers=2)
    pd.testing.assert_frame_equal(parallel, serial)
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()  # appended in job order


def test_results_files_differ_exactly_when_pool_test_set_or_recipe_do(tmp_path):
    pool, test = _pool(), _pool(n_patients=30, seed=9)

    def other_model(train, seed):
        return _sigmoid_of_x(train, seed)

    other_model.recipe = {"model": "other"}
    path = results_file(tmp_path, "real", _sigmoid_of_x, pool, test)
    assert path.parent == tmp_path and path.name.startswith("real-") and path.suffix == ".csv"
    assert results_file(tmp_path, "real", _sigmoid_of_x, pool.copy(), test.copy()) == path
    others = [results_file(tmp_path, "real", _sigmoid_of_x, _pool(seed=3), test),
              results_file(tmp_path, "real", _sigmoid_of_x, pool, _pool(n_patients=30, seed=4)),
              results_file(tmp_path, "real", other_model, pool, test)]
    assert len({path, *others}) == 4
    scaling_curve(_sigmoid_of_x, pool, test, [4], 1, path, progress=False, workers=1)
    scaling_curve(other_model, pool, test, [4], 1, others[2], progress=False, workers=1)  # not refused: its own file


def test_each_pool_of_a_study_goes_as_far_as_it_fills_into_its_own_file(tmp_path):
    small, large, test = _pool(n_patients=12), _pool(n_patients=60, seed=1), _pool(n_patients=30, seed=9)
    curves = scaling_curves(_sigmoid_of_x, {"real": small, "generated": large}, test, [4, 8, 16, 32], 2, tmp_path,
                            prefix="lodo_")
    fills = {name: feasible_sizes([pool], [4, 8, 16, 32]) for name, pool in (("real", small), ("generated", large))}
    assert fills["real"] != fills["generated"]  # the larger pool goes further
    assert {name: sorted(set(g["size"])) for name, g in curves.groupby("name")} == fills
    alone = scaling_curve(_sigmoid_of_x, small, test, fills["real"], 2, tmp_path / "alone.csv", name="real",
                          progress=False)
    pd.testing.assert_frame_equal(curves[curves["name"] == "real"].reset_index(drop=True), alone)
    assert results_file(tmp_path, "lodo_generated", _sigmoid_of_x, large, test).exists()


def test_results_of_another_pool_test_set_or_recipe_are_refused(tmp_path):
    pool, test, path = _pool(), _pool(n_patients=30, seed=9), tmp_path / "r.csv"
    scaling_curve(_sigmoid_of_x, pool, test, [4], 1, path, progress=False)
    with pytest.raises(UsageError, match="another pool"):
        scaling_curve(_sigmoid_of_x, _pool(seed=3), test, [4], 1, path, progress=False)
    with pytest.raises(UsageError, match="another test"):
        scaling_curve(_sigmoid_of_x, pool, _pool(n_patients=30, seed=4), [4], 1, path, progress=False)

    def other_model(train, seed):
        return _sigmoid_of_x(train, seed)

    other_model.recipe = {"model": "other"}
    with pytest.raises(UsageError, match="another recipe"):
        scaling_curve(other_model, pool, test, [4], 1, path, progress=False)
    assert len(pd.read_csv(path)) == 1   # nothing mixed in


def test_summary_is_the_t_interval_across_repeats():
    results = pd.DataFrame({"name": "g", "size": [10] * 4 + [20] * 4, "repeat": [0, 1, 2, 3] * 2,
                            "auc": [.6, .7, .65, .62, .8, .82, .79, .85], "loss": [.7, .6, .65, .66, .5, .45, .52, .4]})
    summary = scaling_summary(results).set_index("size")
    for size, g in results.groupby("size"):
        lo, hi = stats.t.interval(0.95, len(g) - 1, loc=g.auc.mean(), scale=stats.sem(g.auc))
        assert (summary.loc[size, "auc_lo"], summary.loc[size, "auc_hi"]) == pytest.approx((lo, hi))
        assert summary.loc[size, "loss"] == pytest.approx(g.loss.mean())


def test_feasible_sizes_are_those_every_pool_can_fill_class_balanced():
    a = pd.DataFrame({"pathology": ["benign"] * 10 + ["malignant"] * 4})
    b = pd.DataFrame({"pathology": ["benign"] * 3 + ["malignant"] * 30 + ["normal"] * 50})
    # a: at most 4 malignant -> size <= 9 (quota size // 2 positive); b: 3 benign -> size - size // 2 <= 3 -> size <= 6
    assert feasible_sizes([a], [2, 8, 9, 10]) == [2, 8, 9]
    assert feasible_sizes([a, b], [2, 6, 7, 8]) == [2, 6]
    for size in feasible_sizes([a, b], range(2, 20)):   # each of them draws without error
        draw_subset(a.assign(patient_id=range(len(a))), size, seed=0)
        draw_subset(b.assign(patient_id=range(len(b))), size, seed=0)
    with pytest.raises(UsageError):   # and the first size beyond them does not
        draw_subset(a.assign(patient_id=range(len(a))), 10, seed=0)


def test_the_scaling_figure_labels_each_measured_size_once_as_a_plain_number():
    import matplotlib.pyplot as plt

    from busgen_lib.evaluate.scaling import scaling_figure

    sizes = [25, 50, 100, 200, 300, 400, 600]
    summary = pd.DataFrame([{"name": name, "size": s, "repeats": 5, "auc": 0.7, "auc_lo": 0.6, "auc_hi": 0.8,
                             "loss": 0.6, "loss_lo": 0.5, "loss_hi": 0.7}
                            for name in ("real", "generated") for s in sizes])
    fig = scaling_figure(summary)
    fig.canvas.draw()
    axis = fig.axes[1].xaxis
    shown = [t.get_text() for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True) if t.get_text()]
    assert [float(t) for t in shown] == sizes
    plt.close(fig)
