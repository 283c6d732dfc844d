import numpy as np
import pandas as pd
import pytest

from busgen_lib.data.overview import box_relative_areas, example_grid, hierarchy_counts, small_lesion_threshold


def _table():
    return pd.DataFrame({
        "patient_id": ["p1", "p1", "p1", "p2", "p3", "p3"],
        "exam_id": ["e1", "e1", "e2", "e3", "e4", "e4"],
        "lesion_id": ["l1", "l1", "l2", "", "l3", "l3"],
        "pathology": ["benign", "benign", "malignant", "normal", "benign", "benign"],
        "device": ["A", "B", "A", "B", "A", "A"],
        "boxes": ["[[0.1,0.1,0.3,0.5]]", "[[0,0,1,1]]", "[[0.5,0.5,0.6,0.6],[0,0,0.5,0.5]]", "[]",
                  "[[0.2,0.2,0.4,0.4]]", "[[0.2,0.2,0.3,0.3]]"],
    })


def test_hierarchy_counts_count_distinct_ids_per_level():
    table = hierarchy_counts(_table())
    assert table.loc["benign"].tolist() == [2, 2, 2, 4]   # p1,p3 · e1,e4 · l1,l3 · 4 images
    assert table.loc["normal"].tolist() == [1, 1, 0, 1]   # a normal image has no lesion
    assert table.loc["total"].tolist() == [3, 4, 3, 6]


def test_box_areas_are_relative_width_times_height():
    areas = box_relative_areas(_table())
    assert areas == pytest.approx([0.08, 1.0, 0.01, 0.25, 0.04, 0.01])


def test_small_lesion_threshold_leaves_the_requested_share_below():
    areas = np.random.default_rng(0).lognormal(-2.5, 0.8, size=10_000)
    t = small_lesion_threshold(areas)
    assert np.mean(areas < t) == pytest.approx(0.30, abs=0.005)
    with pytest.raises(ValueError, match="at least one box"):
        small_lesion_threshold(np.array([]))


def test_example_grid_picks_one_image_from_each_nonempty_cell():
    df = _table()
    grid = example_grid(df, rows="pathology", cols="device")
    for (pathology, device), idx in grid.stack().dropna().items():
        assert df.loc[int(idx), "pathology"] == pathology and df.loc[int(idx), "device"] == device
    assert np.isnan(grid.loc["malignant", "B"])
