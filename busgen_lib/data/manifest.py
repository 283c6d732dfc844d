"""Manifests: read, validate and write the one-row-per-image table of DESIGN.md.

Everything downstream (datasets, samplers, statistics) trusts a manifest that
came through `read_manifest`, so all checking happens here, at the boundary,
and every problem is reported at once with its file, row and column.

Row numbers are 1-based *data* rows, as a spreadsheet user counts them below
the header: row 1 is the first row after the header, i.e. CSV line row+1.
Paths in `image` and `mask` are relative to the manifest's folder (`root`), or
absolute.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from busgen_lib.atomic import atomic_path
from busgen_lib.data.pixels import pixel_range_problem
from busgen_lib.data.schema import (
    BIRADS,
    BOXES_MISSING,
    COLUMNS,
    PATHOLOGIES,
    REQUIRED_COLUMNS,
    SPLITS,
    Box,
    box_problem,
    parse_boxes,
)
from busgen_lib.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
# PIL modes with a defined grayscale reading (colour is converted with ITU-R 601
# luma). Print/video colour spaces (CMYK, YCbCr, LAB, HSV) are refused: their
# conversion is not an ultrasound intensity, so such files should be re-exported.
IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
PROGRESS_FROM = 2000  # show a progress bar when checking more image files than this
FLAG_TRUE = frozenset({"1", "true", "yes"})
FLAG_VALUES = ("1", "0", "true", "false", "yes", "no")  # or empty, meaning 0
LESIONS = tuple(p for p in PATHOLOGIES if p != "normal")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest; `row` is the 1-based data row (CSV line = row + 1)."""

    file: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column:
            where.append(self.column)
        return f"{':'.join(where)}: {self.message}"


class ManifestError(DataError):
    """A manifest (or a source table) failed validation; `.problems` lists every problem."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def one_line(self) -> str:
        first = str(self.problems[0]) if self.problems else "invalid manifest"
        more = len(self.problems) - 1
        if not more:
            return first
        file = self.problems[0].file
        return f"{first} (and {more} more problem(s); `python -m busgen_lib validate {file}` lists them all)"


class _Issue(NamedTuple):
    """A problem before it knows its file; `pos` is the 0-based row position."""

    pos: int | None
    column: str | None
    message: str


# ------------------------------------------------------------------ public API

def validate_manifest(path: str | Path, root: str | Path | None = None, check_images: bool = True) -> list[Problem]:
    """Every problem of a manifest (CSV or Parquet), sorted by row; [] when it is valid.

    `root` is the folder that relative image/mask paths start from (default: the
    manifest's folder). `check_images=False` checks the table only.
    """
    return _inspect(Path(path), root, check_images)[1]


def read_manifest(path: str | Path, root: str | Path | None = None, check_images: bool = True) -> pd.DataFrame:
    """Load a manifest, raising ManifestError listing every problem if it is invalid.

    The frame has the schema's columns first (a missing `mask` becomes ""), then
    the extra columns; all values are strings, BI-RADS lower-case ("4a"), and
    `df.attrs["root"]` holds the absolute folder that paths resolve against.
    """
    df, problems = _inspect(Path(path), root, check_images)
    if problems:
        raise ManifestError(problems)
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write `df` as CSV or Parquet (by suffix), schema columns first, atomically.

    Image and mask paths are stored relative to the new manifest's folder when
    the file lies under it, absolute otherwise, so the written manifest resolves
    wherever it is read from. Relative paths in `df` are taken against
    `df.attrs["root"]` when set (a frame from `read_manifest`), else as already
    relative to the new folder.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".csv" and suffix not in PARQUET_SUFFIXES:
        raise ValueError(f"cannot write {path}: use a .csv or .parquet file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = _ordered(df.copy())
    out.attrs = {}
    source_root = Path(df.attrs.get("root", path.parent))
    for column in ("image", "mask"):
        if column in out:
            out[column] = [_rebase(str(v), source_root, path.parent) for v in out[column]]
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            out.to_csv(tmp, index=False)
        else:
            out.to_parquet(tmp, index=False)
    return path


def concat_manifests(paths: list[str | Path], out: str | Path) -> Path:
    """One manifest of the rows of several (each with its own folder), validated as a whole, written to `out`.

    E.g. few-shot images plus their device-translated copies. Paths are made
    absolute per source before `write_manifest` rebases them on `out`'s folder;
    the merged table is validated (duplicate images, patients across splits...).
    """
    frames = []
    for source in paths:
        df = read_manifest(source)
        for column in ("image", "mask"):
            df[column] = ["" if not str(v) else str(resolve(df, column, i)) for i, v in enumerate(df[column])]
        frames.append(df)
    merged = pd.concat(frames, ignore_index=True).fillna("")
    written = write_manifest(merged, out)
    try:
        read_manifest(written)
    except ManifestError:
        written.unlink()  # no invalid manifest left behind
        raise
    return written


def resolve(df: pd.DataFrame, column: str, i: int) -> Path:
    """Absolute path of the image or mask in row position `i` (uses `df.attrs["root"]`)."""
    value = str(df[column].iloc[i])
    if not value:
        raise ValueError(f"row {i + 1} has no {column}")
    if Path(value).is_absolute():
        return Path(value)
    if "root" not in df.attrs:
        raise ValueError("df.attrs['root'] is not set: load the manifest with read_manifest, or set it to its folder")
    return Path(df.attrs["root"]) / value


def manifest_path(file: str | Path, folder: str | Path) -> str:
    """How a manifest in `folder` refers to `file`: relative if under `folder`, else absolute.

    Importers use this so a manifest written inside its dataset stays portable
    with it, and one written elsewhere points at the dataset unambiguously.
    """
    file, folder = Path(os.path.abspath(file)), Path(os.path.abspath(folder))
    return (file.relative_to(folder) if file.is_relative_to(folder) else file).as_posix()


def is_flagged(values: pd.Series) -> pd.Series:
    """Which rows of a flag column (e.g. `boxes_missing`) are set ("1", "true", "yes")."""
    return values.astype(str).str.strip().str.lower().isin(FLAG_TRUE)


# ------------------------------------------------------------------ reading

def _inspect(path: Path, root: str | Path | None, check_images: bool) -> tuple[pd.DataFrame, list[Problem]]:
    """Load and check a manifest; returns the normalised frame and its problems."""
    if (why := not_a_regular_file(path)) is not None:  # a FIFO would block the reader forever
        return pd.DataFrame(columns=list(COLUMNS)), [Problem(str(path), None, None, f"cannot read the manifest: {why}")]
    try:
        df = _normalise(_load_table(path))
    except (OSError, ValueError) as err:
        return pd.DataFrame(columns=list(COLUMNS)), [Problem(str(path), None, None, f"cannot read the manifest: {err}")]
    root_dir = Path(os.path.abspath(root if root is not None else path.parent))
    issues = _check_table(df, root_dir)
    if check_images and "image" in df:
        issues += _check_files(df, root_dir)
    problems = [Problem(str(path), None if i.pos is None else i.pos + 1, i.column, i.message) for i in issues]
    problems.sort(key=lambda p: -1 if p.row is None else p.row)
    df = _ordered(df)
    df.attrs["root"] = str(root_dir)
    return df, problems


def _load_table(path: Path) -> pd.DataFrame:
    """The raw table as strings, as a CSV holds them (missing cells are "")."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix in PARQUET_SUFFIXES:
        df = pd.read_parquet(path)
        df = df.apply(_as_text)
    else:
        raise ValueError(f"unknown format {suffix!r}; a manifest is a .csv or .parquet file")
    df.columns = [str(c).strip() for c in df.columns]
    return df.reset_index(drop=True)


def _as_text(col: pd.Series) -> pd.Series:
    """A Parquet column as CSV text: integral floats lose their ".0", missing values become ""."""
    if pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
        col = col.astype("Int64")
    return col.astype("string").fillna("").astype(str)


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Trim schema fields, lower-case the categorical ones, add an empty `mask` if absent."""
    df = df.copy()
    for column in (*COLUMNS, BOXES_MISSING):
        if column in df:
            df[column] = df[column].astype(str).str.strip()
    for column in ("pathology", "birads", "split", BOXES_MISSING):
        if column in df:
            df[column] = df[column].str.lower()
    if "mask" not in df:
        df["mask"] = ""
    return df


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Schema columns in schema order first, extra columns after in their order."""
    first = [c for c in COLUMNS if c in df]
    return df[first + [c for c in df.columns if c not in COLUMNS]]


def _rebase(value: str, source_root: Path, folder: Path) -> str:
    """A path of a frame rooted at `source_root`, as a manifest in `folder` should store it."""
    return manifest_path(_absolute(value, source_root), folder) if value else value


# ------------------------------------------------------------------ table checks

def _check_table(df: pd.DataFrame, root: Path) -> list[_Issue]:
    """All checks that need only the table (no image files)."""
    issues = list(_missing_columns(df))
    for column in ("image", "patient_id"):
        if column in df:
            issues += _empty_values(df, column)
    for column, allowed, allow_empty in (("pathology", PATHOLOGIES, False), ("birads", BIRADS, True),
                                         ("split", SPLITS, True)):
        if column in df:
            issues += _unknown_values(df, column, allowed, allow_empty)
    if BOXES_MISSING in df:
        issues += _unknown_values(df, BOXES_MISSING, FLAG_VALUES, True)
    if "boxes" in df:
        boxes, box_issues = _parse_boxes_column(df["boxes"])
        issues += box_issues
        if "pathology" in df:
            issues += _lesion_box_issues(df, boxes)
    if "image" in df:
        issues += _duplicate_images(df, root)
    if {"lesion_id", "patient_id"} <= set(df.columns):
        issues += _shared_by_groups(df, "lesion_id", "patient_id", "lesion ids must be unique across patients "
                                    "(prefix them with the patient id)")
    if {"patient_id", "split"} <= set(df.columns):
        issues += _shared_by_groups(df[df["split"] != ""], "patient_id", "split",
                                    "a patient's images must all be in one split (split by patient)", report="split")
    return issues


def _missing_columns(df: pd.DataFrame) -> Iterator[_Issue]:
    lower = {c.lower(): c for c in df.columns}
    for column in REQUIRED_COLUMNS:
        if column in df:
            continue
        hint = f" (found {lower[column]!r}: column names are lower-case)" if column in lower else ""
        yield _Issue(None, column, f"required column is missing{hint}; add it (values may be empty where "
                                   "unknown). Required: " + ", ".join(REQUIRED_COLUMNS))


def _empty_values(df: pd.DataFrame, column: str) -> Iterator[_Issue]:
    for pos in _positions(df[column] == ""):
        yield _Issue(pos, column, f"{column} is empty; every row needs one")


def _unknown_values(df: pd.DataFrame, column: str, allowed: Iterable[str], allow_empty: bool) -> Iterator[_Issue]:
    allowed = tuple(allowed)
    ok = df[column].isin(allowed) | ((df[column] == "") if allow_empty else False)
    for pos in _positions(~ok):
        value = df[column].iloc[pos]
        what = "is empty" if value == "" else f"has unknown value {value!r}"
        yield _Issue(pos, column, f"{column} {what}; use one of {', '.join(allowed)}"
                                  + (" or leave it empty" if allow_empty else ""))


def _parse_boxes_column(values: pd.Series) -> tuple[list[list[Box] | None], list[_Issue]]:
    """Parsed boxes per row (None where unparsable) and the issues found on the way."""
    parsed: list[list[Box] | None] = []
    issues: list[_Issue] = []
    for pos, text in enumerate(values.tolist()):
        try:
            boxes = parse_boxes(text)
        except ValueError as err:
            parsed.append(None)
            issues.append(_Issue(pos, "boxes", f"{err}; expected a JSON list like [[x0, y0, x1, y1]] in 0..1"))
            continue
        parsed.append(boxes)
        for k, box in enumerate(boxes):
            if (why := box_problem(box)) is not None:
                issues.append(_Issue(pos, "boxes", f"box {k} has {why}"
                                     + ("; boxes are relative 0..1, divide pixels by the image size"
                                        if why.startswith("coordinates outside") else "")))
    return parsed, issues


def _lesion_box_issues(df: pd.DataFrame, boxes: list[list[Box] | None]) -> Iterator[_Issue]:
    """Normal images have no boxes; lesion images have some unless flagged `boxes_missing`."""
    flags = df[BOXES_MISSING] if BOXES_MISSING in df else pd.Series("", index=df.index)
    for pos, (pathology, row_boxes, flag_text) in enumerate(zip(df["pathology"].tolist(), boxes, flags.tolist())):
        if row_boxes is None or flag_text not in (*FLAG_VALUES, ""):  # already reported as unreadable
            continue
        flag = flag_text in FLAG_TRUE
        if pathology == "normal" and row_boxes:
            yield _Issue(pos, "boxes", f"normal image has {len(row_boxes)} box(es); remove them or fix the pathology")
        elif pathology in LESIONS and not row_boxes and not flag:
            yield _Issue(pos, "boxes", f"{pathology} image has no boxes; add the lesion's box, or set "
                                       f"{BOXES_MISSING}=1 to keep it for classification only")
        elif pathology in LESIONS and row_boxes and flag:
            yield _Issue(pos, BOXES_MISSING, f"{BOXES_MISSING} is set but the row has {len(row_boxes)} box(es); "
                                             "clear one of them")


def _duplicate_images(df: pd.DataFrame, root: Path) -> Iterator[_Issue]:
    first: dict[str, int] = {}
    for pos, value in enumerate(df["image"].tolist()):
        if not value:
            continue
        path = os.path.normpath(os.path.join(root, value))  # strings, not Path: 100k rows stay fast
        if path in first:
            yield _Issue(pos, "image", f"same image as row {first[path] + 1}; a manifest has one row per image")
        else:
            first[path] = pos


def _shared_by_groups(df: pd.DataFrame, key: str, value: str, rule: str, report: str | None = None) -> Iterator[_Issue]:
    """Rows whose `value` differs from the first value seen for their `key` (e.g. a patient in two splits)."""
    seen: dict[str, tuple[int, str]] = {}
    for pos, k, v in zip(df.index, df[key].tolist(), df[value].tolist()):  # index = row position (RangeIndex)
        if k == "":
            continue
        if k not in seen:
            seen[k] = (pos, v)
        elif seen[k][1] != v:
            first_pos, first_v = seen[k]
            yield _Issue(pos, report or key, f"{key} {k!r} has {value} {v!r} here but {first_v!r} at row "
                                             f"{first_pos + 1}; {rule}")


def _positions(mask: pd.Series) -> list[int]:
    """0-based row positions where `mask` is true (manifests are loaded with a RangeIndex)."""
    return [int(i) for i in mask.index[mask.to_numpy(dtype=bool)]]


# ------------------------------------------------------------------ file checks

def _check_files(df: pd.DataFrame, root: Path) -> list[_Issue]:
    """Open each image (and mask) header: exists, readable, one 2-D frame, usable mode, same size."""
    issues: list[_Issue] = []
    rows = zip(df["image"].tolist(), df["mask"].tolist())
    for pos, (image, mask) in enumerate(tqdm(rows, total=len(df), desc="checking images", unit="row",
                                             disable=len(df) <= PROGRESS_FROM)):
        size = None
        if image:
            size, why = _probe(_absolute(image, root))
            if why:
                issues.append(_Issue(pos, "image", why))
        if mask:
            mask_size, why = _probe(_absolute(mask, root))
            if why:
                issues.append(_Issue(pos, "mask", why))
            elif size is not None and mask_size != size:
                issues.append(_Issue(pos, "mask", f"mask is {mask_size[0]}x{mask_size[1]} but its image is "
                                                  f"{size[0]}x{size[1]}; masks must match their image pixel for pixel"))
    return issues


def _absolute(value: str, root: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _probe(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """An image's (width, height) after decoding all its pixels, or why it cannot be used.

    Pixels are decoded (not just the header) so that a truncated or corrupt file
    is caught here, naming the file, rather than deep inside training. Anything
    but a regular file (a directory, FIFO or device) is refused before opening:
    reading a FIFO would block forever.
    """
    if (why := not_a_regular_file(path)) is not None:
        return None, why
    try:
        with Image.open(path) as im:
            size, mode, frames = im.size, im.mode, getattr(im, "n_frames", 1)
            if frames == 1 and mode in IMAGE_MODES:
                im.load()
                why = pixel_range_problem(im)
                if why is not None:
                    return None, f"{path}: {why}"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return None, f"cannot read {path} as an image ({err}); re-export it, e.g. as PNG"
    if frames > 1:
        return None, f"{path} has {frames} frames; store one 2-D frame per file"
    if mode not in IMAGE_MODES:
        return None, f"{path} has mode {mode}, which has no grayscale reading; re-export it as grayscale or RGB"
    return size, None


def not_a_regular_file(path: Path) -> str | None:
    """Why `path` cannot be read as an image file without opening it (missing, folder, FIFO, device), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"file not found: {path}"
    except OSError as err:
        return f"cannot access {path} ({err.strerror})"
    if stat.S_ISDIR(mode):
        return f"{path} is a folder, not an image file; point the row at the image inside it"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file (a FIFO, socket or device); copy the image to a regular file"
    return None


def rows_fingerprint(df: pd.DataFrame, columns: Iterable[str] | None = None) -> str:
    """SHA-256 of a table's rows in order (the given columns where present, else all): which data a model or a
    stored result came from, whatever file the rows were read from."""
    names = list(df.columns) if columns is None else [c for c in columns if c in df]
    text = "\n".join("\t".join(map(str, row)) for row in df[names].astype(str).itertuples(index=False, name=None))
    return hashlib.sha256(text.encode()).hexdigest()
