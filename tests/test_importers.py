"""Importers: synthetic downloaded layouts give exact boxes; the real compact copies import cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busgen_lib.data.importers import import_busbra, import_busi, import_folder, import_shared
from busgen_lib.data.importers._common import subtype_code
from busgen_lib.data.manifest import ManifestError, read_manifest, resolve, validate_manifest
from busgen_lib.data.schema import parse_boxes
from busgen_lib.errors import DataError
from manifest_fixtures import SHARED_DATASETS, busbra_tree, busi_tree, noise, rect_mask, write_png


def _by_source(df: pd.DataFrame, column: str = "source_file") -> pd.DataFrame:
    return df.set_index(column, drop=False)


def _boxes(df: pd.DataFrame, key: str) -> list[tuple[float, ...]]:
    return parse_boxes(df.loc[key, "boxes"])


# ------------------------------------------------------------------ BUSI (downloaded layout)

def test_busi_boxes_come_from_every_mask_file_without_specks(tmp_path):
    df = _by_source(read_manifest(import_busi(busi_tree(tmp_path / "BUSI"), tmp_path / "out")))
    assert _boxes(df, "benign (1).png") == [(0.2, 0.2, 0.4, 0.4), (0.6, 0.6, 0.9, 0.8)]
    assert _boxes(df, "malignant (1).png") == [(0.1, 0.1, 0.5, 0.9)]
    assert _boxes(df, "normal (1).png") == []


def test_busi_union_mask_is_written_only_for_images_with_several_mask_files(tmp_path):
    root = busi_tree(tmp_path / "BUSI")
    df = read_manifest(import_busi(root, tmp_path / "out"))
    masks = {row.source_file: resolve(df, "mask", i) for i, row in enumerate(df.itertuples())}
    assert masks["malignant (1).png"] == root / "malignant" / "malignant (1)_mask.png"
    union = np.asarray(Image.open(masks["benign (1).png"])) > 0
    assert masks["benign (1).png"].is_relative_to(tmp_path / "out")
    assert union[15, 30] and union[35, 70] and union.sum() == 20 * 10 + 30 * 10 + 3


def test_busi_near_duplicates_share_a_patient_and_label_conflicts_are_dropped(tmp_path):
    root = busi_tree(tmp_path / "BUSI")
    df = _by_source(read_manifest(import_busi(root, tmp_path / "out")))
    assert df.loc["benign (1).png", "patient_id"] == df.loc["benign (2).png", "patient_id"]
    assert df["patient_id"].nunique() == 3
    assert "benign (3).png" not in df.index and "malignant (2).png" not in df.index
    dropped = pd.read_csv(tmp_path / "out" / "dropped.csv")
    assert sorted(dropped["image"].str.rsplit("/", n=1).str[-1]) == ["benign (3).png", "malignant (2).png"]
    kept = read_manifest(import_busi(root, tmp_path / "kept", keep_label_conflicts=True))
    assert len(kept) == len(df) + 2 and kept["sim_group_label_conflict"].astype(int).sum() == 2


def test_busi_rejects_a_folder_without_its_layout(tmp_path):
    with pytest.raises(DataError, match="benign"):
        import_busi(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------ BUS-BRA (downloaded layout)

def test_busbra_maps_case_device_histology_and_birads(tmp_path):
    df = _by_source(read_manifest(import_busbra(busbra_tree(tmp_path / "BUSBRA"), tmp_path / "out")), "image")
    df.index = [i.rsplit("/", 1)[-1] for i in df.index]
    one, two = df.loc["bus_0001-l.png"], df.loc["bus_0002-l.png"]
    assert df.loc["bus_0001-r.png", "patient_id"] == one["patient_id"] != two["patient_id"]
    assert df.loc["bus_0001-r.png", "split"] == one["split"]
    assert (one["view"], one["subtype"], one["birads"], one["device"]) == ("l", "fibroadenoma", "3", "GE Logiq 7")
    assert (two["pathology"], two["subtype"], two["birads"]) == ("malignant", "idc", "4")
    assert two["histology"] == "Invasive ductal carcinoma" and two["side"] == "right"
    assert parse_boxes(one["boxes"]) == [(0.1, 0.1, 0.3, 0.5)]
    assert parse_boxes(two["boxes"]) == [(0.5, 0.5, 1.0, 1.0)]


def test_busbra_column_names_are_case_insensitive(tmp_path):
    root = busbra_tree(tmp_path / "BUSBRA", header="id,CASE,histology,pathology,birads,device,side")
    assert len(read_manifest(import_busbra(root, tmp_path / "out"))) == 3


def test_busbra_names_missing_columns_and_bad_rows(tmp_path):
    root = busbra_tree(tmp_path / "BUSBRA", header="ID,Patient,Histology,Pathology,BIRADS,Device,Side")
    with pytest.raises(ManifestError, match="needs ID, Case and Pathology"):
        import_busbra(root, tmp_path / "out")
    root = busbra_tree(tmp_path / "BUSBRA2")
    text = (root / "bus_data.csv").read_text().replace("benign,3", "cyst,3", 1).replace("bus_0002-l", "bus_0009-l")
    (root / "bus_data.csv").write_text(text)
    with pytest.raises(ManifestError) as err:
        import_busbra(root, tmp_path / "out2")
    assert [(p.row, p.column) for p in err.value.problems] == [(1, "Pathology"), (3, "ID")]


# ------------------------------------------------------------------ folder + CSV

def _folder(root, boxes_a: str, boxes_b: str = "") -> tuple:
    write_png(root / "imgs" / "a.png", noise(1, 50, 100))
    write_png(root / "imgs" / "b.png", noise(2, 40, 80))
    write_png(root / "imgs" / "c.png", noise(3, 40, 80))
    write_png(root / "imgs" / "b_mask.png", rect_mask(40, 80, (8, 4, 40, 36)))
    labels = root / "labels.csv"
    pd.DataFrame({"file": ["a.png", "b.png", "c.png"], "label": ["Benign", "malignant", "normal"],
                  "patient": ["p1", "p2", ""], "bbox": [boxes_a, boxes_b, ""], "mask": ["", "b_mask.png", ""],
                  "scanner": ["x", "y", "z"]}).to_csv(labels, index=False)
    return root / "imgs", labels


COLUMN_MAP = {"file": "image", "label": "pathology", "patient": "patient_id", "bbox": "boxes", "scanner": "device"}


@pytest.mark.parametrize("boxes", ["[[20, 10, 40, 20]]", "[[0.2, 0.2, 0.4, 0.4]]"], ids=["pixel", "relative"])
def test_folder_reads_pixel_or_relative_boxes_and_boxes_from_masks(tmp_path, boxes):
    images, labels = _folder(tmp_path, boxes)
    df = read_manifest(import_folder(images, labels, tmp_path / "out", column_map=COLUMN_MAP))
    assert parse_boxes(df["boxes"].iloc[0]) == [(0.2, 0.2, 0.4, 0.4)]
    assert parse_boxes(df["boxes"].iloc[1]) == [(0.1, 0.1, 0.5, 0.9)]
    assert df["pathology"].tolist() == ["benign", "malignant", "normal"]
    assert df["device"].tolist() == ["x", "y", "z"]
    assert df["patient_id"].iloc[2] == "c.png"


def test_folder_flags_lesions_without_boxes_or_mask(tmp_path):
    images, labels = _folder(tmp_path, "")
    df = read_manifest(import_folder(images, labels, tmp_path / "out", column_map=COLUMN_MAP))
    assert df["boxes_missing"].tolist() == ["1", "0", "0"]


def test_folder_names_the_csv_row_and_column_of_each_bad_row(tmp_path):
    images, labels = _folder(tmp_path, "[[20, 10, 140, 20]]")
    table = pd.read_csv(labels, dtype=str, keep_default_na=False)
    table.loc[1, "label"] = "suspicious"
    table.loc[2, "file"] = "missing.png"
    table.to_csv(labels, index=False)
    with pytest.raises(ManifestError) as err:
        import_folder(images, labels, tmp_path / "out", column_map=COLUMN_MAP)
    assert [(p.file, p.row, p.column) for p in err.value.problems] == [
        (str(labels), 2, "pathology"), (str(labels), 3, "image")]
    table.loc[1, "label"], table.loc[2, "file"] = "malignant", "c.png"
    table.to_csv(labels, index=False)
    with pytest.raises(ManifestError, match=r"labels.csv:row 1:boxes: box 0 has coordinates outside 0..1"):
        import_folder(images, labels, tmp_path / "out", column_map=COLUMN_MAP)


def test_folder_says_which_columns_to_map(tmp_path):
    images, labels = _folder(tmp_path, "")
    # The advice is the CLI user's (rename the CSV column); `column_map` does the same from Python.
    with pytest.raises(ManifestError, match="name the CSV column holding it 'image'"):
        import_folder(images, labels, tmp_path / "out")


def test_manifest_written_inside_the_dataset_uses_relative_paths(tmp_path):
    images, labels = _folder(tmp_path, "[[20, 10, 40, 20]]")
    path = import_folder(images, labels, images, column_map=COLUMN_MAP)
    assert pd.read_csv(path)["image"].tolist() == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize("text, code", [
    ("Ductal carcinoma in situ (DCIS)", "dcis"),
    ("Invasive carcinoma of no special type (NST)&Ductal carcinoma in situ (DCIS)", "idc"),
    ("Ductal carcinoma in situ (DCIS)&Invasive carcinoma of no special type (NST)", "idc"),
    ("Fibroadenoma", "fibroadenoma"),
    ("Invasive lobular carcinoma", "ilc"),
    ("Pseudoangiomatous stromal hyperplasia (PASH)", "pash"),
    ("not applicable", ""),
])
def test_subtype_codes_name_the_invasive_component(text, code):
    assert subtype_code(text) == code


# ------------------------------------------------------------------ the real compact copies

# README counts minus the documented drops: BUSI's 19 label-conflict images
# (which include its one exact duplicate), BUS-UCLM's 4 CHVI copies of CHCO images.
SHARED_COUNTS = {
    "busi": ({"benign": 437 - 11, "malignant": 210 - 6, "normal": 133 - 2}, 19),
    "bus_uclm": ({"benign": 174, "malignant": 90 - 1, "normal": 419 - 3}, 4),
    "breast_lesions_usg": ({"benign": 154, "malignant": 98, "normal": 4}, 0),
}
needs_shared = pytest.mark.skipif(not (SHARED_DATASETS / "busi").is_dir(), reason=f"no {SHARED_DATASETS}")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Each compact copy imported once for the module (outputs under tmp, never into shared/)."""
    out = tmp_path_factory.mktemp("shared")
    return {name: import_shared(name, SHARED_DATASETS / name, out / name) for name in SHARED_COUNTS}


@needs_shared
@pytest.mark.parametrize("name", list(SHARED_COUNTS))
def test_shared_copy_imports_valid_with_readme_counts(shared, name):
    df = read_manifest(shared[name])
    counts, n_dropped = SHARED_COUNTS[name]
    assert df["pathology"].value_counts().to_dict() == counts
    assert len(pd.read_csv(shared[name].parent / "dropped.csv")) == n_dropped
    boxes = [v for text in df["boxes"] for box in parse_boxes(text) for v in box]
    assert boxes and min(boxes) >= 0.0 and max(boxes) <= 1.0
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert (df["device"] == "").all() and (df["dataset"] == name).all()


@needs_shared
@pytest.mark.parametrize("name", list(SHARED_COUNTS))
def test_shared_boxes_are_pixel_boxes_over_the_staged_size(shared, name):
    df = read_manifest(shared[name])
    source = pd.read_csv(SHARED_DATASETS / name / "manifest.csv", dtype=str, keep_default_na=False)
    source = source.set_index("image")
    for i in np.flatnonzero(df["boxes"].str.len().to_numpy() > 2)[::50]:
        key = str(resolve(df, "image", i).resolve().relative_to((SHARED_DATASETS / name).resolve()))
        w, h = float(source.loc[key, "width"]), float(source.loc[key, "height"])
        expected = [(round(x0 / w, 6), round(y0 / h, 6), round(x1 / w, 6), round(y1 / h, 6))
                    for x0, y0, x1, y1 in parse_boxes(source.loc[key, "boxes"])]
        assert parse_boxes(df["boxes"].iloc[i]) == expected
        assert Image.open(resolve(df, "image", i)).size == (int(w), int(h))


@needs_shared
def test_shared_busi_patients_are_near_duplicate_groups(shared):
    df = read_manifest(shared["busi"])
    assert (df["patient_id"] == "busi_g" + df["sim_group"].str.zfill(4)).all()
    assert df["patient_id"].nunique() == df["sim_group"].nunique()


@needs_shared
def test_shared_bus_uclm_merges_chco_and_chvi_and_flags_dropped_masks(shared):
    df = read_manifest(shared["bus_uclm"])
    chvi = df[df["patient"] == "CHVI"]
    assert (chvi["patient_id"] == "bus_uclm_CHCO").all() and len(chvi)
    flagged = df.loc[df["boxes_missing"] == "1", "source_file"].tolist()
    assert flagged == ["HESN_002.png", "HESN_003.png", "HESN_004.png", "HESN_005.png"]
    assert (df.loc[df["boxes_missing"] == "1", "mask"] == "").all()


@needs_shared
def test_shared_breast_keeps_birads_descriptors_and_histology(shared):
    df = read_manifest(shared["breast_lesions_usg"])
    assert df["birads"].value_counts().to_dict() == {"4c": 49, "4b": 46, "5": 46, "4a": 44, "3": 37, "2": 30, "1": 4}
    assert (df.loc[df["pathology"] == "normal", "birads"] == "1").all()
    assert (df["subtype"] == "dcis").sum() == 5  # pure DCIS; the other 9 DCIS mentions are invasive
    assert {"shape", "margin", "echogenicity", "posterior_features", "halo", "calcifications",
            "diagnosis", "has_dcis"} <= set(df.columns)
    assert df["patient_id"].is_unique
    other = df.loc[df["other_mask"] != ""].index[0]
    assert resolve(df, "other_mask", other).is_file()


@needs_shared
def test_shared_busi_keeps_everything_when_asked(tmp_path):
    path = import_shared("busi", SHARED_DATASETS / "busi", tmp_path, keep_label_conflicts=True,
                         keep_exact_duplicates=True)
    assert len(read_manifest(path, check_images=False)) == 780
    assert validate_manifest(path, check_images=False) == []


@needs_shared
def test_busi_downloaded_layout_rebuilt_from_the_copy_finds_the_readme_groups(tmp_path):
    """The near-duplicate rule reproduces the copy's sim_group (593 groups, 19 label-conflict images)."""
    source = pd.read_csv(SHARED_DATASETS / "busi" / "manifest.csv", dtype=str, keep_default_na=False)
    for row in source.itertuples():
        folder = tmp_path / "BUSI" / row.label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / row.source_file).symlink_to(SHARED_DATASETS / "busi" / row.image)
        (folder / row.source_file.replace(".png", "_mask.png")).symlink_to(SHARED_DATASETS / "busi" / row.mask)
    df = read_manifest(import_busi(tmp_path / "BUSI", tmp_path / "out", keep_label_conflicts=True))
    conflicts = set(source.loc[source["sim_group_label_conflict"] == "1", "source_file"])
    assert set(df.loc[df["sim_group_label_conflict"] == "1", "source_file"]) == conflicts
    assert abs(df["patient_id"].nunique() - 593) <= 10  # thumbnails of resized copies, not of the originals


def test_a_relative_source_folder_gives_a_manifest_that_resolves_from_anywhere(tmp_path, monkeypatch):
    source = SHARED_DATASETS.resolve() / "bus_uclm"
    if not (source / "manifest.csv").exists():
        pytest.skip("compact BUS-UCLM copy not present")
    monkeypatch.chdir(source.parent)
    manifest = import_shared("bus_uclm", Path("bus_uclm"), tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    assert validate_manifest(manifest) == []
