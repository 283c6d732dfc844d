"""What every importer shares: boxes from masks, near-duplicate groups, subtype codes, writing.

An importer builds one row per image with *absolute* image/mask paths and hands
the frame to `finish`, which splits by patient, writes `<out>/manifest.csv`
(paths relative when under `out`, absolute otherwise: see `manifest_path`) and
refuses to return a manifest that does not validate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import label, regionprops

from busgen_lib.data.manifest import ManifestError, Problem, validate_manifest, write_manifest
from busgen_lib.data.schema import COLUMNS, PATHOLOGIES, Box
from busgen_lib.data.splits import assign_splits

log = logging.getLogger("busgen_lib.data.importers")

MANIFEST_NAME = "manifest.csv"
DROPPED_NAME = "dropped.csv"  # rows an importer left out, with the reason, beside the manifest
# Mask components smaller than this (pixels, at the mask's own resolution) are
# annotation specks, not lesions: BUSI has 1-8 px specks in 22 images.
MIN_COMPONENT_PX = 16
# Near-duplicate rule of the compact copies' READMEs: Pearson correlation of
# 32x32 grayscale thumbnails >= 0.93 links two images; linked images form a group.
THUMBNAIL_SIDE = 32
NEAR_DUPLICATE_CORR = 0.93
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
# Subtype codes used across datasets where a histology name has a common short form.
SUBTYPE_SYNONYMS = {
    "nst": "idc",  # invasive carcinoma of no special type, formerly invasive ductal carcinoma (WHO 2012)
    "invasive_ductal_carcinoma": "idc",
    "invasive_lobular_carcinoma": "ilc",
}


# ------------------------------------------------------------------ masks and boxes

def read_mask(paths: Sequence[Path]) -> np.ndarray:
    """Union of one image's mask files as a boolean array (any non-zero pixel is lesion)."""
    union = None
    for path in paths:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) > 0
        if union is not None and mask.shape != union.shape:
            raise ValueError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but the other masks of its image are "
                             f"{union.shape[1]}x{union.shape[0]}")
        union = mask if union is None else union | mask
    if union is None:
        raise ValueError("no mask files given")
    return union


def mask_boxes(mask: np.ndarray, min_px: int = MIN_COMPONENT_PX) -> list[Box]:
    """Relative [x0, y0, x1, y1] of each 8-connected component of at least `min_px` pixels.

    x1/y1 are exclusive pixel edges divided by the size, so a box covers exactly
    its component at any resolution.
    """
    height, width = mask.shape
    boxes = []
    for region in regionprops(label(mask, connectivity=2)):
        if region.area < min_px:
            continue
        r0, c0, r1, c1 = region.bbox
        boxes.append((c0 / width, r0 / height, c1 / width, r1 / height))
    return boxes


def pixel_to_relative(boxes: Iterable[Sequence[float]], width: float, height: float) -> list[Box]:
    """Pixel boxes (x1/y1 exclusive) as relative 0..1 boxes."""
    return [(x0 / width, y0 / height, x1 / width, y1 / height) for x0, y0, x1, y1 in boxes]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    with Image.open(path) as im:
        return im.size


# ------------------------------------------------------------------ near-duplicate groups

def near_duplicate_groups(paths: Sequence[Path], threshold: float = NEAR_DUPLICATE_CORR,
                          side: int = THUMBNAIL_SIDE, block: int = 1024) -> np.ndarray:
    """Group id per image: connected components of thumbnail correlation >= `threshold`.

    Datasets without patient ids (BUSI) hold re-cropped copies and consecutive
    frames of one lesion; splitting by these groups keeps them in one split.
    """
    z = np.stack([_thumbnail(p, side) for p in paths])
    z -= z.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)  # flat images link to nothing
    rows, cols = [], []
    for start in range(0, len(z), block):
        corr = z[start:start + block] @ z.T
        r, c = np.nonzero(corr >= threshold)
        rows.append(r + start)
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(len(z), len(z)))
    return connected_components(graph, directed=False)[1]


def _thumbnail(path: Path, side: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((side, side), Image.Resampling.BOX), dtype=np.float64).ravel()


def label_conflicts(groups: pd.Series, pathology: pd.Series) -> pd.Series:
    """Rows whose group holds more than one pathology (the same image labelled twice)."""
    return pathology.groupby(groups).transform("nunique") > 1


# ------------------------------------------------------------------ labels

def subtype_code(text: str) -> str:
    """A histology/diagnosis text as a subtype code: "Ductal carcinoma in situ (DCIS)" -> "dcis".

    A parenthesised abbreviation wins, else the words joined by "_"; common
    synonyms map to one code ("nst" -> "idc"). Several diagnoses joined by "&"
    give the first invasive one, so pure DCIS is "dcis" but DCIS with an
    invasive carcinoma is the invasive type (DESIGN's subtypes name the lesion).
    """
    parts = [p.strip() for p in str(text).split("&") if p.strip()]
    parts = [p for p in parts if p.lower() not in {"not applicable", "n/a", "na", "none", "unknown"}]
    if not parts:
        return ""
    invasive = [p for p in parts if "in situ" not in p.lower()]
    return _one_code((invasive or parts)[0])


def _one_code(text: str) -> str:
    abbreviation = re.search(r"\(([A-Za-z]{2,6})\)", text)
    code = abbreviation.group(1).lower() if abbreviation else re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return SUBTYPE_SYNONYMS.get(code, code)


def pathology_problems(values: pd.Series, file: Path, column: str) -> list[Problem]:
    """Source-table rows whose label is not a pathology (rows 1-based below the header)."""
    bad = ~values.isin(PATHOLOGIES)
    return [Problem(str(file), int(i) + 1, column, f"{column} {v!r} is not one of {', '.join(PATHOLOGIES)}")
            for i, v in values[bad].items()]


# ------------------------------------------------------------------ writing

def finish(rows: pd.DataFrame, out: Path, *, seed: int = 0,
           fractions: Sequence[float] = SPLIT_FRACTIONS, dropped: pd.DataFrame | None = None) -> Path:
    """Split by patient, write `<out>/manifest.csv` and `dropped.csv`, and insist the result validates."""
    out.mkdir(parents=True, exist_ok=True)
    frame = rows.copy()
    for column in COLUMNS:
        if column not in frame:
            frame[column] = ""
    if (frame["split"] == "").all():
        frame = assign_splits(frame, fractions=fractions, seed=seed)
    write_dropped(out, dropped if dropped is not None else pd.DataFrame(columns=["image", "reason"]))
    path = write_manifest(frame, out / MANIFEST_NAME)
    problems = validate_manifest(path)
    if problems:
        raise ManifestError(problems)
    return path


def write_dropped(out: Path, dropped: pd.DataFrame) -> None:
    """Record the images an importer left out (image, reason) and say so in the log."""
    dropped.to_csv(out / DROPPED_NAME, index=False)
    if len(dropped):
        counts = ", ".join(f"{reason}: {n}" for reason, n in dropped["reason"].value_counts().items())
        log.warning("%s: left out %d image(s) (%s); listed in %s", out, len(dropped), counts, out / DROPPED_NAME)
