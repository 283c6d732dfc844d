"""Downstream diagnosis: AUCs agree with sklearn, and the comparison can tell a right training set from a wrong one."""

import pytest
from sklearn.metrics import roc_auc_score

from busgen_lib.data.manifest import read_manifest
from busgen_lib.evaluate.utility import binary_task, downstream_auc


@pytest.fixture(scope="module")
def phantom(small_phantom):
    return read_manifest(small_phantom)


def test_right_labels_beat_swapped_labels_and_aucs_match_sklearn(phantom):
    train, test = phantom[phantom["split"] != "test"], phantom[phantom["split"] == "test"]
    swapped = train.assign(pathology=train["pathology"].map({"benign": "malignant", "malignant": "benign"})
                           .fillna(train["pathology"]))
    result = downstream_auc({"real": train, "swapped labels": swapped}, test, size=32, epochs=10, seed=0)
    table = result.table.set_index("training set")
    for name, score in result.scores.items():
        assert table.loc[name, "auc"] == pytest.approx(roc_auc_score(result.y_true, score), abs=1e-12)
        assert table.loc[name, "ci_lo"] <= table.loc[name, "auc"] <= table.loc[name, "ci_hi"]
    assert table.loc["real", "ci_lo"] > 0.6
    assert table.loc["swapped labels", "ci_hi"] < 0.5
    assert table.loc["swapped labels", "delong_p_vs_real"] < 0.01
    assert table.loc["real", "n_train"] == len(binary_task(train, "benign", "malignant")[0])
    assert result.table.attrs["n_test"] == len(result.y_true) == int(test["pathology"].isin(["benign", "malignant"]).sum())


def test_a_set_without_one_class_is_a_clear_error(phantom):
    test = phantom[phantom["split"] == "test"]
    benign_only = phantom[phantom["pathology"] == "benign"]
    with pytest.raises(ValueError, match="training set 'benign only' needs both"):
        downstream_auc({"benign only": benign_only}, test, epochs=1)
    with pytest.raises(ValueError, match="the test set needs both"):
        downstream_auc({"real": phantom}, benign_only, epochs=1)
