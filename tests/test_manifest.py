"""Manifest validation, reading and writing: every rule names file, row and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busgen_lib.data.manifest import (
    ManifestError,
    Problem,
    manifest_path,
    read_manifest,
    resolve,
    validate_manifest,
    write_manifest,
)
from busgen_lib.data.schema import COLUMNS
from manifest_fixtures import IMAGE_H, IMAGE_W, clean_manifest, noise, write_png


def _edit(path: Path, **cells: str) -> None:
    """Set cells given as column__row=value (row 1-based, as problems report it)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for key, value in cells.items():
        column, row = key.rsplit("__", 1)
        df.loc[int(row) - 1, column] = value
    df.to_csv(path, index=False)


def _drop_column(path: Path, column: str) -> None:
    pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=[column]).to_csv(path, index=False)


def _garbage_image(path: Path) -> None:
    (path.parent / "images" / "c.png").write_bytes(b"not a png at all")


def _two_frames(path: Path) -> None:
    frames = [Image.fromarray(noise(k)) for k in range(2)]
    frames[0].save(path.parent / "images" / "multi.tif", save_all=True, append_images=frames[1:])
    _edit(path, image__3="images/multi.tif")


def _cmyk(path: Path) -> None:
    Image.new("CMYK", (IMAGE_W, IMAGE_H)).save(path.parent / "images" / "cmyk.tif")
    _edit(path, image__3="images/cmyk.tif")


def _small_mask(path: Path) -> None:
    write_png(path.parent / "masks" / "a.png", np.zeros((IMAGE_H, IMAGE_W + 1)))


# (defect, how to make it, expected row, expected column, words the message must contain)
DEFECTS = [
    ("missing column", lambda p: _drop_column(p, "device"), None, "device", "required column is missing"),
    ("unknown pathology", lambda p: _edit(p, pathology__2="cancer"), 2, "pathology", "'cancer'"),
    ("empty pathology", lambda p: _edit(p, pathology__4=""), 4, "pathology", "empty"),
    ("unknown BI-RADS", lambda p: _edit(p, birads__3="7"), 3, "birads", "'7'"),
    ("unknown split", lambda p: _edit(p, split__3="dev"), 3, "split", "'dev'"),
    ("empty patient", lambda p: _edit(p, patient_id__4=""), 4, "patient_id", "empty"),
    ("malformed boxes JSON", lambda p: _edit(p, boxes__1="[[0.1, 0.2"), 1, "boxes", "not valid JSON"),
    ("box not four numbers", lambda p: _edit(p, boxes__1="[[0.1, 0.2, 0.3]]"), 1, "boxes", "four numbers"),
    ("box outside 0..1", lambda p: _edit(p, boxes__1="[[0.1, 0.1, 1.5, 0.5]]"), 1, "boxes", "outside 0..1"),
    ("x0 >= x1", lambda p: _edit(p, boxes__1="[[0.5, 0.1, 0.4, 0.3]]"), 1, "boxes", "box 0 has x0 >= x1"),
    ("y0 >= y1", lambda p: _edit(p, boxes__3="[[0.1, 0.1, 0.3, 0.3], [0.5, 0.8, 0.9, 0.8]]"), 3, "boxes",
     "box 1 has y0 >= y1"),
    ("normal with boxes", lambda p: _edit(p, boxes__4="[[0.1, 0.1, 0.2, 0.2]]"), 4, "boxes", "normal image"),
    ("lesion without boxes", lambda p: _edit(p, boxes__3="[]"), 3, "boxes", "boxes_missing=1"),
    ("flag with boxes", lambda p: _edit(p, boxes__5="[[0.1, 0.1, 0.2, 0.2]]"), 5, "boxes_missing", "is set"),
    ("unknown flag value", lambda p: _edit(p, boxes_missing__5="maybe"), 5, "boxes_missing", "'maybe'"),
    ("missing image file", lambda p: _edit(p, image__2="images/nope.png"), 2, "image", "file not found"),
    ("unreadable image", _garbage_image, 3, "image", "cannot read"),
    ("multi-frame image", _two_frames, 3, "image", "2 frames"),
    ("CMYK image", _cmyk, 3, "image", "mode CMYK"),
    ("missing mask file", lambda p: _edit(p, mask__1="masks/nope.png"), 1, "mask", "file not found"),
    ("mask size differs", _small_mask, 1, "mask", "41x30 but its image is 40x30"),
    ("duplicate image", lambda p: _edit(p, image__2="images/./a.png"), 2, "image", "same image as row 1"),
    ("lesion across patients", lambda p: _edit(p, lesion_id__3="L1"), 3, "lesion_id", "'P1'"),
    ("patient in two splits", lambda p: _edit(p, split__2="val"), 2, "split", "'train' at row 1"),
]


def test_clean_manifest_has_no_problems(tmp_path):
    assert validate_manifest(clean_manifest(tmp_path)) == []


@pytest.mark.parametrize("defect, make, row, column, words", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_defect_is_reported_once_with_file_row_and_column(tmp_path, defect, make, row, column, words):
    path = clean_manifest(tmp_path)
    make(path)
    problems = validate_manifest(path)
    assert [(p.file, p.row, p.column) for p in problems] == [(str(path), row, column)], problems
    assert words in problems[0].message


def test_all_problems_are_reported_together_sorted_by_row(tmp_path):
    path = clean_manifest(tmp_path)
    _edit(path, pathology__2="cancer", boxes__1="[[0.5, 0.1, 0.4, 0.3]]", image__4="images/nope.png",
          split__3="dev")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    found = [(p.row, p.column) for p in err.value.problems]
    assert found == [(1, "boxes"), (2, "pathology"), (3, "split"), (4, "image")]
    assert str(err.value).count("\n") == 3


def test_problem_reads_as_one_line_with_file_row_and_column():
    problem = Problem("data/manifest.csv", 17, "boxes", "box 0 has x0 >= x1: [0.5, 0.1, 0.4, 0.3]")
    assert str(problem) == "data/manifest.csv:row 17:boxes: box 0 has x0 >= x1: [0.5, 0.1, 0.4, 0.3]"
    assert str(Problem("m.csv", None, "device", "missing")) == "m.csv:device: missing"


def test_table_checks_alone_skip_image_files(tmp_path):
    path = clean_manifest(tmp_path)
    _edit(path, image__2="images/nope.png")
    assert validate_manifest(path, check_images=False) == []


def test_unreadable_manifest_is_one_problem(tmp_path):
    path = tmp_path / "manifest.xlsx"
    path.write_text("x")
    [problem] = validate_manifest(path)
    assert problem.row is None and "csv or .parquet" in problem.message


def test_birads_spellings_are_accepted_and_lower_cased(tmp_path):
    path = clean_manifest(tmp_path)
    _edit(path, birads__2="4A", birads__3=" 5 ")
    df = read_manifest(path)
    assert df["birads"].tolist() == ["3", "4a", "5", "", "4c"]


def test_read_orders_schema_columns_first_and_records_root(tmp_path):
    path = clean_manifest(tmp_path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=["mask"])
    frame.insert(0, "note", "x")
    frame[list(frame.columns[::-1])].to_csv(path, index=False)
    df = read_manifest(path)
    assert tuple(df.columns) == COLUMNS + ("boxes_missing", "note")  # extras keep their file order
    assert (df["mask"] == "").all()
    assert df.attrs["root"] == str(tmp_path)
    assert resolve(df, "image", 2) == tmp_path / "images" / "c.png"


def test_root_argument_overrides_the_manifest_folder(tmp_path):
    path = clean_manifest(tmp_path / "data")
    moved = tmp_path / "elsewhere" / "manifest.csv"
    moved.parent.mkdir()
    path.rename(moved)
    assert validate_manifest(moved)  # images are not beside it any more
    assert validate_manifest(moved, root=tmp_path / "data") == []


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_then_read_round_trips(tmp_path, suffix):
    df = read_manifest(clean_manifest(tmp_path))
    again = read_manifest(write_manifest(df, tmp_path / f"copy{suffix}"))
    pd.testing.assert_frame_equal(again, df)


def test_writing_elsewhere_rebases_paths_so_they_still_resolve(tmp_path):
    df = read_manifest(clean_manifest(tmp_path / "data"))
    out = write_manifest(df, tmp_path / "runs" / "manifest.parquet")
    moved = read_manifest(out)
    assert [resolve(moved, "image", i) for i in range(len(df))] == [resolve(df, "image", i) for i in range(len(df))]
    assert moved["mask"].iloc[3] == ""


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    df = read_manifest(clean_manifest(tmp_path))
    write_manifest(df, tmp_path / "manifest.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "manifest.csv", "masks"]
    with pytest.raises(ValueError, match="csv or .parquet"):
        write_manifest(df, tmp_path / "manifest.txt")


def test_manifest_path_is_relative_under_the_folder_and_absolute_outside(tmp_path):
    assert manifest_path(tmp_path / "d" / "img.png", tmp_path) == "d/img.png"
    assert manifest_path(tmp_path / "img.png", tmp_path / "d") == (tmp_path / "img.png").as_posix()


def test_parquet_numbers_read_like_csv_text(tmp_path):
    df = pd.read_csv(clean_manifest(tmp_path), dtype=str, keep_default_na=False)
    df["birads"] = [3.0, np.nan, 5.0, np.nan, 2.0]
    df.to_parquet(tmp_path / "manifest.parquet", index=False)
    assert read_manifest(tmp_path / "manifest.parquet")["birads"].tolist() == ["3", "", "5", "", "2"]


def test_checking_many_image_headers_is_fast(tmp_path):
    """100k-row manifests must be checkable: header reads only, well under 1 ms per file."""
    import time

    path = clean_manifest(tmp_path)
    normal = pd.read_csv(path, dtype=str, keep_default_na=False).iloc[[3]]
    big = pd.concat([normal] * 1500, ignore_index=True)
    big["image"] = [f"images/n{i}.png" for i in range(len(big))]
    big["patient_id"] = [f"N{i}" for i in range(len(big))]
    for name in big["image"]:
        (tmp_path / name).hardlink_to(tmp_path / "images" / "d.png")
    big.to_csv(path, index=False)
    start = time.perf_counter()
    assert validate_manifest(path) == []
    assert (time.perf_counter() - start) / len(big) < 1e-3


def test_concat_manifests_rebases_paths_and_validates_the_union(tmp_path):
    from busgen_lib.data.manifest import concat_manifests

    first = clean_manifest(tmp_path / "a")
    second = clean_manifest(tmp_path / "b")
    merged = read_manifest(concat_manifests([first, second], tmp_path / "m" / "all.csv"))
    originals = pd.concat([read_manifest(first), read_manifest(second)])
    assert len(merged) == len(originals)
    assert all(resolve(merged, "image", i).exists() for i in range(len(merged)))
    with pytest.raises(ManifestError, match="row 6:image: same image as row 1"):
        concat_manifests([first, first], tmp_path / "m" / "twice.csv")
    assert not (tmp_path / "m" / "twice.csv").exists()


def test_rows_fingerprint_follows_the_chosen_columns_and_takes_missing_values():
    from busgen_lib.data.manifest import rows_fingerprint

    df = pd.DataFrame({"image": ["a.png", "b.png"], "pathology": ["benign", None], "extra": [1.0, float("nan")]})
    assert rows_fingerprint(df) == rows_fingerprint(df.copy())
    assert rows_fingerprint(df, ("image",)) == rows_fingerprint(df.assign(extra=[2.0, 3.0]), ("image", "missing"))
    assert rows_fingerprint(df) != rows_fingerprint(df.assign(extra=[2.0, 3.0]))
    assert rows_fingerprint(df) != rows_fingerprint(df.iloc[::-1])  # row order counts
