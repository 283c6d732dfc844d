"""BUS-BRA (Gómez-Flores et al. 2024) in the layout its users download.

`root/bus_data.csv` (ID e.g. `bus_0001-l`, Case, Histology, Pathology, BIRADS,
Device, ...), `root/Images/<ID>.png`, `root/Masks/mask_<ID without bus_>.png`.
Column names are matched case-insensitively. Patients are the `Case` numbers;
BUS-BRA annotates one lesion per case, so the case is also the lesion id and
the ID suffix (`l`, `r`, ...) the view.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from busgen_lib.data.importers._common import (
    SPLIT_FRACTIONS,
    finish,
    image_size,
    mask_boxes,
    pathology_problems,
    read_mask,
    subtype_code,
)
from busgen_lib.data.manifest import ManifestError, Problem
from busgen_lib.data.schema import BOXES_MISSING, format_boxes
from busgen_lib.errors import DataError

TABLE_NAME = "bus_data.csv"
REQUIRED = ("id", "case", "pathology")
KNOWN = ("id", "case", "histology", "pathology", "birads", "device")


def import_busbra(root: str | Path, out: str | Path, *, seed: int = 0,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> Path:
    """Write `<out>/manifest.csv` for a downloaded BUS-BRA tree; returns its path.

    Boxes come from each image's mask; subtype is the histology as a code
    (verbatim text kept in `histology`), BI-RADS as given ("4" is category 4
    undivided), device as given. Other columns of bus_data.csv are kept,
    lower-cased.
    """
    root, out = Path(root).resolve(), Path(out)  # absolute: paths must not depend on the working directory
    table = _read_table(root / TABLE_NAME)
    problems = pathology_problems(table["pathology"], root / TABLE_NAME, "Pathology")
    problems += [Problem(str(root / TABLE_NAME), i + 1, "ID", f"image not found: {_image(root, v)}")
                 for i, v in enumerate(table["id"]) if not _image(root, v).is_file()]
    if problems:
        raise ManifestError(problems)
    rows = pd.DataFrame([_row(root, r) for r in table.to_dict("records")])
    extras = table.drop(columns=[c for c in KNOWN if c != "histology"])
    return finish(pd.concat([rows, extras], axis=1), out, seed=seed, fractions=fractions)


def _read_table(path: Path) -> pd.DataFrame:
    """bus_data.csv with trimmed lower-case column names and trimmed string values."""
    if not path.is_file():
        raise DataError(f"{path} not found; BUS-BRA's root holds {TABLE_NAME}, Images/ and Masks/")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [c.strip().lower() for c in table.columns]
    missing = [c for c in REQUIRED if c not in table]
    if missing:
        raise ManifestError([Problem(str(path), None, c, f"column missing; {TABLE_NAME} needs ID, Case and "
                                     "Pathology, and may have Histology, BIRADS, Device (any case)") for c in missing])
    table = table.apply(lambda col: col.str.strip())
    table["pathology"] = table["pathology"].str.lower()
    return table


def _image(root: Path, image_id: str) -> Path:
    return root / "Images" / f"{image_id}.png"


def _mask(root: Path, image_id: str) -> Path:
    return root / "Masks" / f"mask_{image_id.removeprefix('bus_')}.png"


def _row(root: Path, record: dict[str, str]) -> dict[str, str]:
    image_id = record["id"]
    image, mask = _image(root, image_id), _mask(root, image_id)
    has_mask = mask.is_file() and image_size(mask) == image_size(image)  # a mismatched mask cannot locate the lesion
    boxes = mask_boxes(read_mask([mask])) if has_mask and record["pathology"] != "normal" else []
    return {
        "image": str(image), "patient_id": f"busbra_{record['case']}", "lesion_id": f"busbra_{record['case']}",
        "view": image_id.rpartition("-")[2] if "-" in image_id else "", "pathology": record["pathology"],
        "subtype": subtype_code(record.get("histology", "")), "birads": record.get("birads", "").lower(),
        "device": record.get("device", ""), "boxes": format_boxes(boxes), "mask": str(mask) if has_mask else "",
        BOXES_MISSING: "1" if record["pathology"] != "normal" and not boxes else "0",
    }
