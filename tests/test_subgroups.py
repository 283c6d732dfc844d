"""Subgroup AUCs (Supplementary §7): per-group AUC equals scikit-learn's, small groups are reported, size bins."""

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from busgen_lib.data.overview import small_lesion_threshold
from busgen_lib.errors import UsageError
from busgen_lib.evaluate.forest import forest_plot
from busgen_lib.evaluate.stats import bootstrap_ci
from busgen_lib.evaluate.stats import rank_auc
from busgen_lib.evaluate.subgroups import NO_BOX, birads_category, lesion_size_groups, subgroup_auc

matplotlib.use("Agg")


def _hand_case():
    device = ["A"] * 8 + ["B"] * 8 + ["C"] * 3
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1])
    s = np.array([.1, .4, .35, .8, .2, .9, .7, .6, .3, .2, .6, .5, .9, .1, .8, .4, .2, .3, .9])
    return pd.DataFrame({"device": device}), y, s


def test_each_group_auc_is_sklearn_on_its_rows_and_small_groups_are_flagged_not_dropped():
    df, y, s = _hand_case()
    table = subgroup_auc(df, y, s, "device", min_per_class=2, n_boot=200).set_index("group")
    assert list(table.index) == ["all", "A", "B", "C"]
    for g in ["A", "B"]:
        rows = (df.device == g).to_numpy()
        assert table.loc[g, "auc"] == pytest.approx(roc_auc_score(y[rows], s[rows]))
        assert (table.loc[g, "n"], table.loc[g, "n_pos"]) == (rows.sum(), y[rows].sum())
        assert (table.loc[g, "ci_lo"], table.loc[g, "ci_hi"]) == pytest.approx(
            bootstrap_ci(rank_auc, y[rows], s[rows], n_boot=200, stratify=y[rows])[1:])
    assert table.loc["all", "auc"] == pytest.approx(roc_auc_score(y, s))
    assert table.loc["C", "status"].startswith("too small") and np.isnan(table.loc["C", "auc"])
    assert (table.loc["C", "n"], table.loc["C", "n_pos"], table.loc["C", "n_neg"]) == (3, 1, 2)
    assert (table.loc[["A", "B"], "status"] == "ok").all()


def test_grouping_function_and_bad_inputs():
    df, y, s = _hand_case()
    by_score = subgroup_auc(df, y, s, lambda d: np.where(np.arange(len(d)) < 8, "first", "rest"),
                            overall=False, min_per_class=2, n_boot=50).set_index("group")
    assert by_score.loc["first", "auc"] == pytest.approx(roc_auc_score(y[:8], s[:8]))
    with pytest.raises(UsageError, match="no column 'subtype'"):
        subgroup_auc(df, y, s, "subtype")
    with pytest.raises(UsageError, match="one entry per test row"):
        subgroup_auc(df, y[:-1], s, "device")


def _boxes(*areas):
    return json.dumps([[0.0, 0.0, a, 1.0] for a in areas])   # width a, height 1: area a


def test_size_bins_use_training_quantiles_and_the_largest_box():
    train = pd.DataFrame({"boxes": [_boxes(a / 100) for a in range(1, 11)] + [""]})
    test = pd.DataFrame({"boxes": [_boxes(0.02), _boxes(0.05), _boxes(0.02, 0.09), "", _boxes(0.037)]})
    bins = lesion_size_groups(test, train)
    small, large = bins.attrs["edges"]
    assert small == pytest.approx(0.037)          # 0.30 quantile of 0.01..0.10 by linear interpolation
    assert small == pytest.approx(small_lesion_threshold(np.arange(1, 11) / 100))
    assert large == pytest.approx(0.073)
    names = list(bins.cat.categories)
    assert list(bins) == [names[0], names[1], names[2], NO_BOX, names[1]]   # the edge belongs to the upper bin


def test_forest_plot_draws_each_scored_group_at_its_auc():
    df, y, s = _hand_case()
    table = subgroup_auc(df, y, s, "device", min_per_class=2, n_boot=50)
    fig = forest_plot({"BUS-DM": table})
    points = fig.axes[0].lines[0].get_xdata()
    assert np.allclose(points, table.auc[table.status == "ok"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["all (n=19)", "A (n=8)", "B (n=8)", "C (n=3)"]


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 10, 300).astype(float)   # many ties
    assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_birads_category_merges_4a_4b_4c_only():
    df = pd.DataFrame({"birads": ["2", "3", "4", "4a", "4B", "4c", "5", ""]})
    assert list(birads_category(df)) == ["2", "3", "4", "4", "4", "4", "5", ""]
