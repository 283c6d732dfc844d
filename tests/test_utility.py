"""Downstream diagnosis across seeds: AUCs agree with sklearn and scipy, the comparison tells a right training set
from a wrong one, and the random-removal control keeps the cleaned class counts."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from busgen_lib.data.manifest import read_manifest
from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.utility import binary_task, downstream_auc, random_removal


@pytest.fixture(scope="module")
def phantom(small_phantom):
    return read_manifest(small_phantom)


def test_right_labels_beat_swapped_labels_across_seeds_and_numbers_match_sklearn_and_scipy(phantom):
    train, test = phantom[phantom["split"] != "test"], phantom[phantom["split"] == "test"]
    swapped = train.assign(pathology=train["pathology"].map({"benign": "malignant", "malignant": "benign"})
                           .fillna(train["pathology"]))
    result = downstream_auc({"real": train, "swapped labels": swapped}, test, seeds=(0, 1), size=32, epochs=10)
    table = result.table.set_index("arm")
    auc = {name: np.array([roc_auc_score(result.y_true, s) for s in scores]) for name, scores in result.scores.items()}
    assert len(result.scores["real"]) == 2 and result.seeds == (0, 1)
    assert table.loc["real", "auc_mean"] == pytest.approx(auc["real"].mean(), abs=1e-12)
    assert table.loc["swapped labels", "t_p"] == pytest.approx(sps.ttest_rel(auc["swapped labels"], auc["real"]).pvalue)
    assert auc["real"].min() > 0.6 and auc["swapped labels"].max() < 0.5
    assert table.loc["swapped labels", "ensemble_delong_p"] < 0.01
    assert table.loc["real", "n_train"] == len(binary_task(train, "benign", "malignant")[0])
    assert table.attrs["n_test"] == len(result.y_true) == int(test["pathology"].isin(["benign", "malignant"]).sum())


def test_a_set_without_one_class_or_a_single_seed_is_a_clear_error(phantom):
    test = phantom[phantom["split"] == "test"]
    benign_only = phantom[phantom["pathology"] == "benign"]
    with pytest.raises(DataError, match="training set 'benign only' needs both"):
        downstream_auc({"benign only": benign_only}, test, seeds=(0, 1), epochs=1)
    with pytest.raises(DataError, match="the test set needs both"):
        downstream_auc({"real": phantom}, benign_only, seeds=(0, 1), epochs=1)
    with pytest.raises(UsageError, match="at least 2 distinct seeds"):
        downstream_auc({"real": phantom}, test, seeds=(0,), epochs=1)


def generated_and_kept():
    generated = pd.DataFrame({"image": [f"{i}.png" for i in range(30)],
                              "pathology": ["normal"] * 5 + ["benign"] * 10 + ["malignant"] * 15})
    generated.attrs["root"] = "/somewhere"
    kept = generated.iloc[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 18]]  # 5 normal, 7 benign, 4 malignant
    return generated, kept


def test_random_removal_keeps_the_cleaned_counts_per_class_with_a_random_choice():
    generated, kept = generated_and_kept()
    control = random_removal(generated, kept, seed=1)
    assert control["pathology"].value_counts().to_dict() == {"normal": 5, "benign": 7, "malignant": 4}
    assert control["image"].is_unique and set(control["image"]) <= set(generated["image"])
    assert control.attrs["root"] == "/somewhere"  # images still resolve
    assert control.equals(random_removal(generated, kept, seed=1))
    choices = {tuple(random_removal(generated, kept, seed=s)["image"]) for s in range(5)}
    assert len(choices) == 5  # C(15, 4) x C(10, 7) choices: five seeds do not repeat one
    assert tuple(kept["image"]) not in choices


def test_random_removal_refuses_kept_rows_that_are_not_from_the_generated_set():
    generated, kept = generated_and_kept()
    with pytest.raises(DataError, match="not a subset"):
        random_removal(generated.iloc[:10], kept)
