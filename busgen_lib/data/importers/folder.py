"""Any folder of images plus a CSV of labels: the way a user brings their own data.

The CSV needs an image file name (relative to the images folder) and a
pathology per row; it may also have any schema column (patient_id, boxes,
mask, device, birads, subtype, lesion_id, ...), and its other columns are kept.
`column_map` renames the CSV's columns to schema names, as DataFrame.rename
does: {"filename": "image", "label": "pathology"}.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

from busgen_lib.data.importers._common import (
    SPLIT_FRACTIONS,
    finish,
    image_size,
    mask_boxes,
    pathology_problems,
    pixel_to_relative,
    read_mask,
)
from busgen_lib.data.manifest import ManifestError, Problem
from busgen_lib.data.schema import BOXES_MISSING, COLUMNS, Box, box_problem, format_boxes, parse_boxes
from busgen_lib.errors import UsageError

log = logging.getLogger(__name__)
BoxUnit = Literal["auto", "pixel", "relative"]


def import_folder(images_dir: str | Path, labels_csv: str | Path, out: str | Path, *,
                  column_map: Mapping[str, str] | None = None, boxes_unit: BoxUnit = "auto", seed: int = 0,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> Path:
    """Write `<out>/manifest.csv` for `images_dir` labelled by `labels_csv`; returns its path.

    Boxes (JSON [[x0, y0, x1, y1], ...]) are pixels (x1/y1 exclusive) or
    relative, one unit per file; "auto" infers it from the values and refuses
    a file that mixes pixel-looking and relative-looking rows, naming them.
    A lesion without boxes gets them from its mask, or `boxes_missing=1`.
    Rows without a patient_id count as their own patient (logged: views of one
    patient could then straddle splits). Bad rows raise ManifestError naming
    the CSV row (1-based below the header) and column.
    """
    images_dir, labels_csv, out = Path(images_dir).resolve(), Path(labels_csv), Path(out)  # cwd-independent paths
    table = _read_labels(labels_csv, column_map or {})
    boxes, problems = _source_boxes(table, labels_csv)
    problems += pathology_problems(table["pathology"], labels_csv, "pathology")
    problems += _missing_files(table, images_dir, labels_csv)
    if problems:
        raise ManifestError(problems)
    pixels = _boxes_are_pixels(boxes, boxes_unit, labels_csv)
    table = _fill_patients(table)  # after the checks: its warning is for an import that goes ahead
    rows = [_row(record, row_boxes, images_dir, pixels) for record, row_boxes in zip(table.to_dict("records"), boxes)]
    problems = _box_problems(rows, labels_csv)
    if problems:
        raise ManifestError(problems)
    extras = table.drop(columns=[c for c in table if c in COLUMNS or c == BOXES_MISSING])
    return finish(pd.concat([pd.DataFrame(rows), extras], axis=1), out, seed=seed, fractions=fractions)


def _read_labels(path: Path, column_map: Mapping[str, str]) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, keep_default_na=False).rename(columns=dict(column_map))
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("image", "pathology") if c not in table]
    if missing:
        raise ManifestError([Problem(str(path), None, c, f"column missing (found: {', '.join(table.columns)}); "
                                     f"name the CSV column holding it {c!r}") for c in missing])
    table = table.apply(lambda col: col.str.strip())
    for column in ("pathology", "birads", "split", BOXES_MISSING):
        if column in table:
            table[column] = table[column].str.lower()
    return table


def _source_boxes(table: pd.DataFrame, path: Path) -> tuple[list[list[Box]], list[Problem]]:
    """Boxes per CSV row as written (unit not yet known), and the rows that do not parse."""
    if "boxes" not in table:
        return [[] for _ in range(len(table))], []
    boxes, problems = [], []
    for i, text in enumerate(table["boxes"]):
        try:
            boxes.append(parse_boxes(text))
        except ValueError as err:
            boxes.append([])
            problems.append(Problem(str(path), i + 1, "boxes", str(err)))
    return boxes, problems


def _missing_files(table: pd.DataFrame, images_dir: Path, path: Path) -> list[Problem]:
    """Rows whose image (always needed) or mask (when named) is not a file under `images_dir`."""
    problems = []
    for column in ("image", "mask"):
        for i, name in enumerate(table.get(column, [])):
            if (name or column == "image") and not (images_dir / name).is_file():
                problems.append(Problem(str(path), i + 1, column, f"file not found: {images_dir / name}"))
    return problems


def _boxes_are_pixels(boxes: list[list[Box]], unit: BoxUnit, path: Path) -> bool:
    """Whether the CSV's boxes are pixels; one unit per file.

    "auto" decides from the values: a row is pixel-looking when one of its values
    exceeds 1, relative-looking when all are within 0..1. A file with both kinds
    is refused, naming the rows that disagree with the majority: one mistyped
    relative value (1.02) must not turn every other box into pixels.
    """
    if unit not in ("auto", "pixel", "relative"):
        raise UsageError(f"--box-units must be auto, pixel or relative, not {unit!r}")
    if unit != "auto":
        return unit == "pixel"
    looks_pixel = {i: any(v > 1 for box in row for v in box) for i, row in enumerate(boxes) if row}
    pixel_rows = [i for i, is_pixel in looks_pixel.items() if is_pixel]
    relative_rows = [i for i, is_pixel in looks_pixel.items() if not is_pixel]
    if pixel_rows and relative_rows:
        odd, kind, other = ((pixel_rows, "pixels (a value above 1)", "relative (all values within 0..1)")
                            if len(pixel_rows) <= len(relative_rows) else
                            (relative_rows, "relative (all values within 0..1)", "pixels (a value above 1)"))
        majority = len(looks_pixel) - len(odd)
        raise ManifestError([Problem(str(path), i + 1, "boxes", f"boxes look like {kind} but {majority} other "
                                     f"row(s) look like {other}; fix the row, or state the unit with "
                                     "--box-units pixel or --box-units relative") for i in odd])
    return bool(pixel_rows)


def _row(record: dict[str, str], boxes: list[Box], images_dir: Path, pixels: bool) -> dict[str, str]:
    """One manifest row: absolute paths, relative boxes (from the mask when the CSV has none)."""
    image = images_dir / record["image"]
    mask = images_dir / record["mask"] if record.get("mask") else None
    if pixels and boxes:
        boxes = pixel_to_relative(boxes, *image_size(image))
    if not boxes and mask is not None and record["pathology"] != "normal":
        boxes = mask_boxes(read_mask([mask]))
    lesion_without_box = record["pathology"] != "normal" and not boxes
    row = {c: record.get(c, "") for c in COLUMNS}
    row.update(image=str(image), mask=str(mask or ""), boxes=format_boxes(boxes),
               **{BOXES_MISSING: "1" if lesion_without_box else "0"})
    return row


def _box_problems(rows: list[dict[str, str]], path: Path) -> list[Problem]:
    """Boxes that are invalid once relative (e.g. pixel boxes beyond the image), by CSV row."""
    return [Problem(str(path), i + 1, "boxes", f"box {k} has {why}")
            for i, row in enumerate(rows) for k, box in enumerate(parse_boxes(row["boxes"]))
            if (why := box_problem(box))]


def _fill_patients(table: pd.DataFrame) -> pd.DataFrame:
    """Rows without a patient id become their own patient (named after the image file)."""
    if "patient_id" not in table:
        table["patient_id"] = ""
    empty = table["patient_id"] == ""
    if empty.any():
        log.warning("%d image(s) have no patient_id; each is treated as its own patient, so views of one "
                    "patient may land in different splits", int(empty.sum()))
        table.loc[empty, "patient_id"] = table.loc[empty, "image"]
    return table
