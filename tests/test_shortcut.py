"""Device shortcut (Supplementary §6, ref. 29): confounded splits hit the requested phi, a device-only
model shows the gap a label-feature model does not, pixel shuffling keeps only intensity statistics."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats.contingency import association
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import matthews_corrcoef

from busgen_lib.data.dataset import load_grayscale
from busgen_lib.data.manifest import resolve
from busgen_lib.errors import UsageError
from busgen_lib.evaluate.shortcut import (
    TESTS, balanced_counterpart_plan, confounded_split, dab_estimate, pixel_shuffled, shortcut_report,
    remedy_study, shortcut_summary,
)

DEVICES = [f"d{k}" for k in range(6)]
GROUPS = (("d0", "d1", "d2"), ("d3", "d4", "d5"))


def _table(n=3000, seed=0) -> pd.DataFrame:
    """One image per patient; pathology independent of device; x carries the label, device the gain."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    device = rng.choice(DEVICES, n)
    return pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)], "split": rng.choice(["train", "test"], n),
                         "pathology": np.where(y == 1, "malignant", "benign"), "device": device,
                         "x": rng.normal(1.5 * y, 1.0)})


def _phi(df):
    return matthews_corrcoef(df.pathology == "malignant", df.device_group == "B")


@pytest.mark.parametrize("strength", [0.0, 0.5, 0.8, 1.0])
def test_split_hits_the_requested_correlation_and_tests_are_balanced(strength):
    df = _table()
    train, tests = confounded_split(df, strength, seed=1, groups=GROUPS)
    n = len(train) // 2
    assert _phi(train) == pytest.approx(strength, abs=2 / n) and train.attrs["phi"] == pytest.approx(_phi(train))
    table = pd.crosstab(train.pathology, train.device_group).reindex(columns=["A", "B"], fill_value=0).to_numpy()
    if strength < 1:   # Cramér's V of a 2x2 table is |phi|
        assert association(table, method="cramer") == pytest.approx(abs(_phi(train)))
    assert (train.pathology == "malignant").sum() == n
    sizes = {len(t) for t in tests.values()}
    assert len(sizes) == 1
    m = sizes.pop() // 2
    for name, target in zip(TESTS, [strength, 0.0, -strength]):
        assert _phi(tests[name]) == pytest.approx(target, abs=2 / m)
        assert (tests[name].pathology == "malignant").sum() == m
        assert set(tests[name].patient_id).isdisjoint(train.patient_id)
    assert set(train.split) == {"train"} and set(tests["deconfounded"].split) == {"test"}


def test_infeasible_bias_is_refused():
    df = _table(200)
    df.loc[(df.device.isin(GROUPS[1])) & (df.pathology == "malignant"), "device"] = "d0"
    with pytest.raises(UsageError, match="too few training images"):
        confounded_split(df, 0.5, groups=GROUPS)


def _group_only(train, seed):
    """The share of malignant images of each device group in training: a pure device shortcut."""
    share = train.groupby("device_group").pathology.apply(lambda s: (s == "malignant").mean())
    return lambda rows: rows.device_group.map(share).to_numpy()


def _label_feature(train, seed):
    model = LogisticRegression().fit(train[["x"]], train.pathology == "malignant")
    return lambda rows: model.predict_proba(rows[["x"]])[:, 1]


def test_a_device_only_model_has_auc_one_plus_phi_over_two_and_a_label_model_no_gap():
    strength = 0.8
    train, tests = confounded_split(_table(), strength, seed=2, groups=GROUPS)
    device = shortcut_report(_group_only, train, tests, seeds=[0], n_boot=20).set_index("test")
    for name, test in tests.items():   # a binary score's AUC is (1 + phi) / 2
        assert device.loc[name, "auc"] == pytest.approx((1 + _phi(test)) / 2)
    assert device.loc["confounded", "auc"] - device.loc["anti-confounded", "auc"] > 0.7
    label = shortcut_summary(shortcut_report(_label_feature, train, tests, seeds=[0, 1], n_boot=20)).set_index("test")
    assert label.loc["confounded", "auc"] > 0.8
    assert abs(label.loc["anti-confounded", "drop_from_confounded"]) < 0.05


def test_seeds_fitted_in_worker_processes_give_the_one_process_report(monkeypatch):
    import os

    from busgen_lib import parallel

    train, tests = confounded_split(_table(), 0.8, seed=2, groups=GROUPS)
    pids = []

    def seeded(rows, seed):   # the label feature plus seed-drawn noise, so that a mixed-up seed would show
        pids.append(os.getpid())
        score = _label_feature(rows, seed)
        return lambda test: np.clip(score(test) + np.random.default_rng(seed).normal(0, 0.3, len(test)), 0, 1)

    forked = shortcut_report(seeded, train, tests, seeds=[0, 1, 2], n_boot=20)
    assert pids == []   # every fit ran in a worker
    monkeypatch.setattr(parallel, "default_workers", lambda: 1)
    alone = shortcut_report(seeded, train, tests, seeds=[0, 1, 2], n_boot=20)
    assert len(pids) == 3
    pd.testing.assert_frame_equal(forked, alone)
    assert forked.groupby("seed")["auc"].mean().nunique() == 3


def test_summary_drop_is_the_paired_mean_over_seeds():
    report = pd.DataFrame({"seed": [0, 0, 1, 1], "test": ["confounded", "deconfounded"] * 2,
                           "auc": [0.9, 0.6, 0.8, 0.7]})
    summary = shortcut_summary(report).set_index("test")
    assert summary.loc["deconfounded", "drop_from_confounded"] == pytest.approx(0.2)
    assert summary.loc["deconfounded", "auc"] == pytest.approx(0.65)


def _label_and_group(train, seed):
    """Logistic regression on the label feature x and the device group: it uses the group as far as training lets it."""
    features = lambda rows: np.column_stack([rows.x, rows.device_group == "B"])
    model = LogisticRegression().fit(features(train), train.pathology == "malignant")
    return lambda rows: model.predict_proba(features(rows))[:, 1]


def test_balanced_generated_data_removes_the_device_shortcut():
    strength = 0.8
    real, generated = _table(seed=3), _table(n=2000, seed=4)   # generated: device independent of pathology
    summary, biased, tests = remedy_study(_label_and_group, real, generated, strength, seeds=[0, 1], seed=5, n_boot=20)
    drop = summary.xs("anti-confounded", level="test")["drop_from_confounded"]
    # Without the shortcut a model scores alike on every test (the label feature has no device in it); the
    # biased one loses a large share of its confounded AUC when the correlation flips.
    assert drop["real, device-confounded"] > 0.1
    assert abs(drop["generated, balanced"]) < 0.03
    assert set(biased.split) == {"train"} and biased.attrs["phi"] == pytest.approx(strength, abs=0.01)


def test_too_few_generated_images_for_the_remedy_are_refused():
    with pytest.raises(UsageError, match="generate more images"):
        remedy_study(_group_only, _table(seed=3), _table(n=50, seed=4), 0.8, seeds=[0], seed=5, n_boot=20)


# ---------------------------------------------------------------- ref. 29: pixel shuffling

def _images(tmp_path, strength, n=600, size=8, seed=0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Device group B: higher gain (global). Malignant: the same pixel values, brighter half on the left
    (layout only: the histogram of a malignant image has the distribution of a benign one)."""
    rng = np.random.default_rng(seed)
    df = _table(n, seed).assign(image="", boxes="", mask="")
    (tmp_path / "img").mkdir(parents=True)
    for i, row in df.iterrows():
        values = rng.normal(0.4 + 0.2 * (row.device in GROUPS[1]), 0.05, size * size)
        if row.pathology == "malignant":
            bright, dark = np.sort(values)[::-1].reshape(2, -1)
            values = np.concatenate([rng.permutation(bright).reshape(size, size // 2),
                                     rng.permutation(dark).reshape(size, size // 2)], axis=1)
        image = values.reshape(size, size)
        Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
        df.loc[i, "image"] = f"img/{i}.png"
    df.attrs["root"] = str(tmp_path)
    train, tests = confounded_split(df, strength, seed=seed, groups=GROUPS)
    return train, tests["confounded"]


def _pixels(rows):
    return np.stack([load_grayscale(resolve(rows, "image", i))[0].numpy().ravel() for i in range(len(rows))])


def _image_model(train, seed):
    """Logistic regression on (mean intensity, left-minus-right contrast)."""
    def features(rows):
        px = _pixels(rows)
        side = px.reshape(len(rows), 8, 8)
        return np.column_stack([px.mean(1), side[:, :, :4].mean((1, 2)) - side[:, :, 4:].mean((1, 2))])
    model = LogisticRegression(C=100).fit(features(train), train.pathology == "malignant")
    return lambda rows: model.predict_proba(features(rows))[:, 1]


def test_pixel_shuffling_keeps_each_histogram_and_destroys_the_layout(tmp_path):
    train, _ = _images(tmp_path, 0.5, n=120)
    rows = train.iloc[:20]
    shuffled = pixel_shuffled(rows, tmp_path / "sh", size=8, seed=3)
    before, after = _pixels(rows), _pixels(shuffled)
    assert np.array_equal(np.sort(before, axis=1), np.sort(after, axis=1))
    assert (before != after).any(axis=1).mean() > 0.9
    assert np.array_equal(after, _pixels(pixel_shuffled(rows, tmp_path / "again", size=8, seed=3)))


def test_dab_estimate_sees_the_device_shortcut_only_when_the_data_are_confounded(tmp_path):
    confounded = dab_estimate(_image_model, *_images(tmp_path / "c", 0.9), seeds=[0], workdir=tmp_path / "wc",
                              size=8).iloc[0]
    clean = dab_estimate(_image_model, *_images(tmp_path / "u", 0.0), seeds=[0], workdir=tmp_path / "wu",
                         size=8).iloc[0]
    assert confounded.p_source > 0.9 and confounded.p_dabis > 0.85    # gain alone predicts the label
    assert abs(clean.p_dabis - 0.5) < 0.15                              # nothing but layout carries it
    assert confounded.p_est == pytest.approx(confounded.p_source - confounded.p_dabis + 0.5)
    assert clean.p_est > confounded.p_est


def test_dab_seeds_fitted_in_worker_processes_give_the_one_process_estimate(tmp_path, monkeypatch):
    from busgen_lib import parallel

    train, test = _images(tmp_path / "c", 0.9)

    def seeded(rows, seed):   # each seed fits on its own draw of the rows, so that a mixed-up seed would show
        return _image_model(rows.sample(frac=0.5, random_state=seed), seed)

    forked = dab_estimate(seeded, train, test, seeds=[0, 1, 2], workdir=tmp_path / "w", size=8)
    monkeypatch.setattr(parallel, "default_workers", lambda: 1)
    alone = dab_estimate(seeded, train, test, seeds=[0, 1, 2], workdir=tmp_path / "w", size=8)
    pd.testing.assert_frame_equal(forked, alone)
    assert forked["seed"].tolist() == [0, 1, 2] and forked["p_dabis"].nunique() == 3


def test_balanced_counterpart_fills_every_pathology_device_cell_equally():
    train, _ = confounded_split(_table(), 0.8, groups=GROUPS)
    plan = balanced_counterpart_plan(train, n=100)
    counts = pd.crosstab(plan.pathology, plan.device)
    assert counts.shape == (2, 6) and counts.to_numpy().max() - counts.to_numpy().min() <= 1
    assert len(balanced_counterpart_plan(train)) == len(train)
