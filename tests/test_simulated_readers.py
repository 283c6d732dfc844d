"""Simulated Turing-test readers: their CSV is a reader-study export that evaluate.turing reads unchanged, and
their answers follow the signal-detection closed forms (accuracy Φ(d′/2), specificity Φ(c + d′/2))."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.simulated_readers import dprime_from_auc, simulate_turing_export, turing_items
from busgen_lib.evaluate.turing import EXPORT_COLUMNS, POOLED, read_turing_export, turing_table


def _items(n_per_source: int) -> pd.DataFrame:
    real = pd.DataFrame({"image": [f"r{i}.png" for i in range(n_per_source + 3)], "pathology": "benign",
                         "birads": "3"})
    generated = pd.DataFrame({"image": [f"g{i}.png" for i in range(n_per_source)], "pathology": "malignant",
                              "birads": ""})
    real.attrs["root"] = "/data/real"
    return turing_items(real, generated, n_per_source, seed=1)


def test_export_reads_back_with_every_reader_answering_every_image_once(tmp_path):
    items = _items(10)
    export = simulate_turing_export(items, ["A", "B", "C"], d_prime=1.0, seed=0)
    assert list(export.columns) == list(EXPORT_COLUMNS)
    export.to_csv(tmp_path / "answers.csv", index=False)
    answers = read_turing_export(tmp_path / "answers.csv")
    assert len(answers) == 60 and set(answers["reader"]) == {"A", "B", "C"}
    for _, rows in answers.groupby("reader"):
        assert sorted(rows["image_id"]) == sorted(items["image_id"])
        assert sorted(rows["position"].astype(int)) == list(range(20))
        assert (pd.to_datetime(rows["answered_at"]) > pd.to_datetime(rows["shown_at"])).all()
    assert set(answers["confidence"].astype(int)) <= {1, 2, 3, 4, 5}
    assert items["image_id"].str.fullmatch(r"[0-9a-f]{16}").all() and items["image_id"].is_unique
    assert (items["truth_source"] == "generated").sum() == 10
    assert items.loc[items["truth_source"] == "real", "truth_image"].str.startswith("/data/real/r").all()


def test_accuracy_and_specificity_follow_the_closed_forms():
    items = _items(2000)
    d, c = 1.2, 0.4
    table = turing_table(simulate_turing_export(items, ["A"], d_prime=d, criterion=c, seed=3)).set_index("reader")
    n = 2000  # per source
    # Evidence N(±d/2, 1), call "generated" when above c: specificity Φ(c + d/2), sensitivity 1 − Φ(c − d/2).
    spec, sens = norm.cdf(c + d / 2), 1 - norm.cdf(c - d / 2)
    assert table.loc[POOLED, "specificity"] == pytest.approx(spec, abs=4 * math.sqrt(spec * (1 - spec) / n))
    assert table.loc[POOLED, "sensitivity"] == pytest.approx(sens, abs=4 * math.sqrt(sens * (1 - sens) / n))
    unbiased = turing_table(simulate_turing_export(items, ["A"], d_prime=d, seed=4)).set_index("reader")
    acc = norm.cdf(d / 2)
    assert unbiased.loc[POOLED, "accuracy"] == pytest.approx(acc, abs=4 * math.sqrt(acc * (1 - acc) / (2 * n)))


def test_a_reader_with_a_huge_criterion_calls_everything_real_and_readers_differ():
    items = _items(20)
    export = simulate_turing_export(items, ["A", "B"], d_prime=[0.0, 3.0], criterion=[50.0, 0.0], seed=0)
    assert (export.loc[export["reader"] == "A", "answer"] == "real").all()
    assert (export.loc[export["reader"] == "A", "confidence"] == "5").all()
    assert export.loc[export["reader"] == "B", "answer"].nunique() == 2
    with pytest.raises(UsageError, match="one value per reader"):
        simulate_turing_export(items, ["A", "B"], d_prime=[1.0, 2.0, 3.0])


def test_dprime_from_auc_inverts_the_binormal_auc():
    for d in (0.0, 0.5, 2.0):
        assert dprime_from_auc(norm.cdf(d / math.sqrt(2))) == pytest.approx(d, abs=1e-12)
    with pytest.raises(UsageError):
        dprime_from_auc(1.0)


def test_turing_items_refuse_too_few_images():
    real = pd.DataFrame({"image": ["a.png"], "pathology": ["benign"]})
    with pytest.raises(DataError, match="2 real images asked"):
        turing_items(real, real, 2)
    assert np.all(turing_items(real, real, 1)["truth_birads"] == "")
