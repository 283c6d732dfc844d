import numpy as np
import pandas as pd
import pytest

from busgen_lib.data.splits import assign_splits


def _toy(n_patients=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        pathology = rng.choice(["normal", "benign", "malignant"], p=[0.3, 0.45, 0.25])
        for v in range(rng.integers(1, 9)):
            rows.append({"patient_id": f"P{p:04d}", "pathology": pathology, "image": f"P{p}_{v}.png"})
    return pd.DataFrame(rows)


def test_no_patient_is_in_two_splits():
    out = assign_splits(_toy())
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()


def test_image_shares_track_fractions_within_each_pathology():
    df = _toy(600)
    out = assign_splits(df, fractions=(0.7, 0.15, 0.15), seed=3)
    for _, sub in out.groupby("pathology"):
        share = sub["split"].value_counts(normalize=True)
        assert share["train"] == pytest.approx(0.7, abs=0.03)
        assert share["val"] == pytest.approx(0.15, abs=0.03)
        assert share["test"] == pytest.approx(0.15, abs=0.03)


def test_deterministic_by_seed_and_different_across_seeds():
    df = _toy()
    a, b, c = assign_splits(df, seed=1), assign_splits(df, seed=1), assign_splits(df, seed=2)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_bad_fractions_and_missing_groups_are_refused():
    df = _toy(10)
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(df, fractions=(0.5, 0.5, 0.5))
    df.loc[0, "patient_id"] = ""
    with pytest.raises(ValueError, match="patient_id"):
        assign_splits(df)
