"""The reader model and the model-versus-readers analysis of the early-diagnosis study (Fig 4c–d)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate import readers as R
from busgen_lib.evaluate.stats import permutation_test


def _truth(n_pos: int, n_neg: int) -> pd.Series:
    return pd.Series([1] * n_pos + [0] * n_neg, index=[f"img{i:03d}" for i in range(n_pos + n_neg)])


# --------------------------------------------------------------------------- the simulated panel

def test_panel_means_equal_the_targets_and_readers_differ():
    panel = R.simulate_panel(9, 0.813, 0.379, spread=0.4, seed=1)
    assert np.mean([r.sensitivity for r in panel]) == pytest.approx(0.813, abs=1e-9)
    assert np.mean([r.specificity for r in panel]) == pytest.approx(0.379, abs=1e-9)
    assert np.std([r.sensitivity for r in panel]) > 0.02
    assert R.simulate_panel(1, 0.8, 0.4, seed=1) == [R.Reader("reader_1", 0.8, 0.4)]


def test_simulated_reads_reproduce_each_readers_sensitivity_and_specificity_at_4a():
    panel = R.simulate_panel(9, 0.813, 0.379, seed=2)
    truth = _truth(100_000, 100_000)
    reads = R.simulate_reads(panel, truth.index, truth.to_numpy(), seed=3)
    points = R.operating_points(truth.to_numpy(), R.reads_matrix(reads, truth), thresholds=["4a"])
    for reader, row in zip(panel, points.itertuples()):
        assert row.sensitivity == pytest.approx(reader.sensitivity, abs=0.005)
        assert row.specificity == pytest.approx(reader.specificity, abs=0.005)
    assert points["sensitivity"].mean() == pytest.approx(0.813, abs=0.003)
    assert points["specificity"].mean() == pytest.approx(0.379, abs=0.003)


def test_higher_birads_thresholds_trade_sensitivity_for_specificity_as_the_gaussian_observer_says():
    reader = R.Reader("r", 0.8, 0.4)
    truth = _truth(100_000, 100_000)
    reads = R.simulate_reads([reader], truth.index, truth.to_numpy(), seed=4)
    points = R.operating_points(truth.to_numpy(), R.reads_matrix(reads, truth)).set_index("threshold")
    for k, threshold in enumerate(R.THRESHOLDS):
        cut = reader.criteria[k]
        assert points.loc[threshold, "specificity"] == pytest.approx(sps.norm.cdf(cut), abs=0.005)
        assert points.loc[threshold, "sensitivity"] == pytest.approx(sps.norm.sf(cut - reader.d_prime), abs=0.005)


def test_assisted_read_is_unchanged_without_trust_and_follows_the_model_with_full_trust():
    truth = _truth(50, 50)
    score = np.random.default_rng(0).random(100)
    panel = R.simulate_panel(3, 0.8, 0.4, seed=0)
    none = R.simulate_reads(panel, truth.index, truth.to_numpy(), score, trust=0.0, seed=5)
    assert (none["birads"] == none["birads_assisted"]).all()
    full = R.simulate_reads(panel, truth.index, truth.to_numpy(), score, trust=1.0, seed=5)
    after = R.reads_matrix(full, truth, "birads_assisted")
    assert ((after >= R.BIRADS.index("4a")).to_numpy() == (score >= 0.5)[:, None]).all()


def test_bad_panel_parameters_are_refused():
    with pytest.raises(UsageError, match="sensitivity"):
        R.simulate_panel(3, 1.0, 0.4)
    with pytest.raises(UsageError, match="probabilities"):
        R.simulate_reads(R.simulate_panel(1, 0.8, 0.4), ["a"], np.array([1]), np.array([1.5]))


# --------------------------------------------------------------------------- gains at matched operating points

def _hand_case():
    """4 DCIS, 4 benign. Model ROC: thr .7 → (sens .75, spec 1); thr .3 → (1, .75).
    Reader A: sens .75, spec .5; reader B: sens .5, spec .25 → means .625 and .375."""
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05])
    a = np.array([1, 1, 1, 0, 1, 1, 0, 0])
    b = np.array([1, 1, 0, 0, 1, 1, 1, 0])
    ranks = pd.DataFrame({"A": np.where(a, 2, 1), "B": np.where(b, 2, 1)})  # 4a or 3
    return y, score, ranks


def test_model_operating_points_at_a_given_specificity_or_sensitivity_by_hand():
    y, score, _ = _hand_case()
    assert R.sensitivity_at_specificity(y, score, 0.375) == (1.0, 0.3)
    assert R.sensitivity_at_specificity(y, score, 0.9) == (0.75, 0.7)
    assert R.specificity_at_sensitivity(y, score, 0.625) == (1.0, 0.7)
    assert R.specificity_at_sensitivity(y, score, 0.8) == (0.75, 0.3)


def test_matched_gains_by_hand():
    y, score, ranks = _hand_case()
    table = R.matched_gains(y, score, ranks, n_boot=200, n_perm=1000).set_index("comparison")
    sens = table.loc["sensitivity at readers' mean specificity"]
    spec = table.loc["specificity at readers' mean sensitivity"]
    fields = ["matched_at", "readers", "model", "gain"]
    assert sens[fields].tolist() == pytest.approx([0.375, 0.625, 1.0, 0.375])
    assert spec[fields].tolist() == pytest.approx([0.625, 0.375, 1.0, 0.625])
    # P on the 4 DCIS cases: model correct (1,1,1,1) vs readers' mean (1,1,.5,0): 2^4 sign flips enumerated;
    # differences (0, 0, .5, 1); |mean| ≥ observed 0.375 only when the two informative cases keep, or both
    # swap, sides: 2 of their 4 sign patterns, times 4 patterns of the others → 8/16
    assert sens["p"] == pytest.approx(8 / 16)
    assert sens["ci_lo"] <= sens["gain"] <= sens["ci_hi"]


def test_operating_points_by_hand():
    y, _, ranks = _hand_case()
    points = R.operating_points(y, ranks, ["4a", "4b"]).set_index(["reader", "threshold"])
    assert points.loc[("A", "4a"), ["sensitivity", "specificity"]].tolist() == [0.75, 0.5]
    assert points.loc[("B", "4a"), ["sensitivity", "specificity"]].tolist() == [0.5, 0.25]
    assert points.loc[("A", "4b"), ["sensitivity", "specificity"]].tolist() == [0.0, 1.0]


# --------------------------------------------------------------------------- permutation P

def test_assisted_accuracy_p_is_the_exact_sign_test_on_discordant_cases():
    rng = np.random.default_rng(7)
    for _ in range(20):
        y = rng.integers(0, 2, 12)
        before = pd.DataFrame({"r": rng.integers(1, 4, 12)})
        after = pd.DataFrame({"r": rng.integers(1, 4, 12)})
        row = R.assisted_accuracy(y, before, after, n_perm=10_000).iloc[0]
        right = [(m["r"].to_numpy() >= 2) == y.astype(bool) for m in (before, after)]
        gained, lost = int((right[1] & ~right[0]).sum()), int((right[0] & ~right[1]).sum())
        expected = 1.0 if gained + lost == 0 else sps.binomtest(gained, gained + lost, 0.5).pvalue
        assert row["p"] == pytest.approx(expected)
        assert row["change"] == pytest.approx(right[1].mean() - right[0].mean())


def test_gain_p_is_uniform_under_the_null():
    """Continuous exchangeable pairs (model vs panel on the same cases, 30 cases so permutations are drawn): the
    p-values of 1,000 null runs follow U(0, 1) (KS test at 0.001: a correct P fails it for 1 seed in 1,000), and
    a real difference gives small p."""
    rng = np.random.default_rng(8)
    ps = [permutation_test(np.mean, *rng.normal(size=(2, 30)), n_perm=300, seed=k, paired=True)
          for k in range(1000)]
    assert sps.kstest(ps, "uniform").pvalue > 0.001
    shifted = permutation_test(np.mean, rng.normal(1.0, 1, 30), rng.normal(size=30), n_perm=300, paired=True)
    assert shifted < 0.01


# --------------------------------------------------------------------------- a real study's export

def test_an_export_round_trips_through_the_analysis(tmp_path):
    truth = _truth(20, 20)
    rng = np.random.default_rng(10)
    score = np.clip(truth.to_numpy() * 0.4 + rng.random(40) * 0.6, 0, 1)
    reads = R.simulate_reads(R.simulate_panel(3, 0.8, 0.4, seed=1), truth.index, truth.to_numpy(), score, seed=2)
    reads["birads"] = reads["birads"].str.upper()  # "4A" as a person would type it
    path = tmp_path / "export.csv"
    reads.sample(frac=1.0, random_state=0).to_csv(path, index=False)
    back = R.read_reader_export(path, truth)
    for column in ("birads", "birads_assisted"):
        pd.testing.assert_frame_equal(R.reads_matrix(back, truth, column), R.reads_matrix(reads, truth, column))
    y = truth.to_numpy()
    direct = R.matched_gains(y, score, R.reads_matrix(reads, truth), n_boot=50, n_perm=200)
    via_csv = R.matched_gains(y, score, R.reads_matrix(back, truth), n_boot=50, n_perm=200)
    pd.testing.assert_frame_equal(direct, via_csv)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.drop(columns="birads"), r"lacks the column\(s\) \['birads'\]"),
    (lambda d: d.assign(birads=d["birads"].where(d.index != 3, "6")), r"row 5, field 'birads': '6' is not a BI-RADS"),
    (lambda d: d.assign(birads_assisted=d["birads"].where(d.index != 0, "")), r"row 2, field 'birads_assisted': empty"),
    (lambda d: pd.concat([d, d.iloc[[1]]]), r"row 10: reader 'reader_1' read image 'img001' twice"),
    (lambda d: d.assign(image=d["image"].where(d.index != 2, "nope")), r"row 4, field 'image': 'nope' is not a test"),
    (lambda d: d.drop(index=7), r"reader 'reader_2' has no read of 1 test image"),
])
def test_bad_exports_are_refused_naming_file_row_and_field(tmp_path, edit, message):
    truth = _truth(2, 2)
    reads = R.simulate_reads(R.simulate_panel(2, 0.8, 0.4), truth.index, truth.to_numpy(), seed=0)
    reads["birads_assisted"] = reads["birads"]
    path = tmp_path / "bad.csv"
    edit(reads).to_csv(path, index=False)
    with pytest.raises(DataError, match=message) as error:
        R.read_reader_export(path, truth)
    assert "bad.csv" in str(error.value)


# --------------------------------------------------------------------------- notebook 06's study design

def test_the_early_diagnosis_test_set_keeps_out_the_few_shot_patients_and_takes_one_view_per_lesion():
    from busgen_lib.experiments.early_diagnosis import held_out_test

    dcis = pd.DataFrame({"image": [f"d{i}.png" for i in range(6)], "patient_id": ["A", "A", "B", "B", "C", "C"],
                         "lesion_id": ["A1", "A1", "B1", "B1", "C1", "C2"], "split": "train",
                         "pathology": "malignant"})
    pretrain = pd.DataFrame({"image": ["b0.png", "b1.png", "b2.png", "m0.png"], "patient_id": ["P", "P", "Q", "R"],
                             "lesion_id": ["P1", "P1", "Q1", "R1"], "split": ["test", "test", "train", "test"],
                             "pathology": ["benign", "benign", "benign", "malignant"]})
    dcis.attrs["root"] = pretrain.attrs["root"] = "/data"   # as read_manifest sets it
    test = held_out_test(dcis, pretrain, shots=dcis.iloc[[0]])
    assert test["lesion_id"].tolist() == ["B1", "C1", "C2", "P1"]
    assert test["image"].tolist()[0] == "/data/d2.png"
    with pytest.raises(DataError, match="held-out DCIS"):
        held_out_test(dcis, pretrain, shots=dcis)


def test_a_real_sets_radiologists_are_one_reader_point():
    from busgen_lib.experiments.early_diagnosis import real_reader_points

    manifest = pd.DataFrame({"lesion_id": ["a", "a", "b", "c", "d", "e"],
                             "subtype": ["dcis", "dcis", "dcis", "fibroadenoma", "cyst", "idc"],
                             "pathology": ["malignant", "malignant", "malignant", "benign", "benign", "malignant"],
                             "birads": ["4b", "4b", "3", "4A", "2", "5"]})
    y, points = real_reader_points(manifest, {"subtype": "dcis"}, {"pathology": "benign"})
    assert y.tolist() == [1, 1, 0, 0]          # lesions a, b, c, d; e (IDC) is neither class
    at_4a = points.set_index("threshold").loc["4a"]
    assert (at_4a["sensitivity"], at_4a["specificity"]) == (0.5, 0.5)


def test_the_reader_study_apps_birads_export_is_read_as_it_comes(tmp_path):
    truth = _truth(2, 1)
    app = pd.DataFrame({"reader": ["r1"] * 3 + ["r2"] * 3, "image_id": [f"{i:016x}" for i in range(6)],
                        "truth_image": list(truth.index) * 2, "birads": ["4b", "3", "2", "5", "4a", "4c"],
                        "second_birads": ["4c", "3", "3", "5", "4b", "4c"], "answer": ""})
    app.to_csv(tmp_path / "answers.csv", index=False)
    reads = R.read_reader_export(tmp_path / "answers.csv", truth)
    after = R.reads_matrix(reads, truth, "birads_assisted")
    assert after["r1"].tolist() == [4, 1, 1] and after["r2"].tolist() == [5, 3, 4]
    app.assign(second_birads="").to_csv(tmp_path / "no_model.csv", index=False)
    assert "birads_assisted" not in R.read_reader_export(tmp_path / "no_model.csv", truth)


def test_bus_dms_generated_training_set_is_class_balanced_from_the_two_generators():
    from busgen_lib.experiments.early_diagnosis import generated_training_set

    dcis = pd.DataFrame({"image": ["d0.png", "d1.png"], "pathology": "malignant"})
    base = pd.DataFrame({"image": [f"b{i}.png" for i in range(6)],
                         "pathology": ["normal", "benign", "malignant", "benign", "benign", "benign"]})
    dcis.attrs["root"] = base.attrs["root"] = "/gen"
    rows = generated_training_set(dcis, base, seed=0)
    assert rows["pathology"].value_counts().to_dict() == {"malignant": 2, "benign": 2}
    benign_images = {f"/gen/b{i}.png" for i in (1, 3, 4, 5)}
    assert set(rows["image"][rows["pathology"] == "benign"]) <= benign_images
    with pytest.raises(DataError, match="0 benign"):
        generated_training_set(dcis, base[base["pathology"] != "benign"])


def test_a_birads_study_run_in_the_reader_study_app_feeds_the_analysis_unchanged(tmp_path):
    """Notebook 06's test.csv (absolute image paths, the model's output column) → `reader-study create` → answers
    (first read, then after the model's output) → export → read_reader_export: the reads come back as given."""
    from busgen_lib.data.manifest import read_manifest, write_manifest
    from busgen_lib.data.phantom import write_phantom
    from busgen_lib.experiments.generalisation import absolute
    from busgen_lib.reader_study.create import create_study
    from busgen_lib.reader_study.store import Study

    df = absolute(read_manifest(write_phantom(tmp_path / "phantom", n=6, size=32, seed=1, progress=False)))
    test = write_manifest(df.assign(bus_dm=0.5), tmp_path / "06" / "test.csv")
    truth = pd.Series((df["pathology"] == "malignant").astype(int).to_numpy(), index=df["image"].astype(str))
    created = create_study(tmp_path / "study", ["alice", "bob"], real=[test], question="birads", model_column="bus_dm")
    study, given = Study(created.folder), {}
    for reader in ("alice", "bob"):
        while (item := study.current(reader)) is not None:
            first, second = R.BIRADS[item.position % 6], R.BIRADS[(item.position + 1) % 6]
            key = "second_birads" if item.second else "birads"
            assert study.record(reader, item.position, item.image_id, {key: second if item.second else first},
                                item.second)
            given[(reader, item.position)] = (first, second)
    study.write_export(tmp_path / "answers.csv")
    reads = R.read_reader_export(tmp_path / "answers.csv", truth)
    assert len(reads) == 2 * len(truth)
    export = pd.read_csv(tmp_path / "answers.csv", dtype=str)
    for row, read in zip(export.itertuples(), reads.itertuples()):
        assert (read.birads, read.birads_assisted) == given[(row.reader, int(row.position))]
        assert read.image == row.truth_image
