"""BUSI (Al-Dhabyani et al. 2020) in the layout its users download.

`root/<class>/<class> (N).png` with masks `<class> (N)_mask.png` and, for a
second or third lesion, `_mask_1.png`, `_mask_2.png` (`root` may also be the
folder holding `Dataset_BUSI_with_GT/`). BUSI has no patient ids, so images
are grouped by near-duplicate thumbnails and split by group; groups whose
images carry different labels are left out unless asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from busgen_lib.data.importers._common import (
    SPLIT_FRACTIONS,
    finish,
    label_conflicts,
    mask_boxes,
    near_duplicate_groups,
    read_mask,
)
from busgen_lib.data.manifest import manifest_path
from busgen_lib.data.schema import BOXES_MISSING, PATHOLOGIES, format_boxes
from busgen_lib.errors import DataError

_FILE = re.compile(r"^(?P<cls>benign|malignant|normal) \((?P<num>\d+)\)(?P<mask>_mask(?:_\d+)?)?\.png$")


def import_busi(root: str | Path, out: str | Path, *, keep_label_conflicts: bool = False, seed: int = 0,
                fractions: Sequence[float] = SPLIT_FRACTIONS) -> Path:
    """Write `<out>/manifest.csv` for a downloaded BUSI tree; returns its path.

    Boxes come from the 8-connected components of the union of an image's mask
    files. Images with two or more mask files get their union written to
    `<out>/masks/`; all other paths point into `root`. patient_id is the
    near-duplicate group ("busi_g0007"), device/subtype/BI-RADS are unknown ("").
    """
    root, out = _dataset_folder(Path(root).resolve()), Path(out)  # cwd-independent paths
    files = _scan(root)
    rows = pd.DataFrame([_row(cls, num, masks, out) for (cls, num), masks in sorted(files.items())])
    groups = near_duplicate_groups([Path(p) for p in rows["image"]])
    rows["patient_id"] = [f"busi_g{g:04d}" for g in groups]
    rows["sim_group"] = groups.astype(str)
    conflict = label_conflicts(rows["patient_id"], rows["pathology"])
    rows["sim_group_label_conflict"] = conflict.astype(int).astype(str)
    dropped = pd.DataFrame(columns=["image", "reason"])
    if not keep_label_conflicts:
        dropped = pd.DataFrame({"image": [manifest_path(p, out) for p in rows.loc[conflict, "image"]],
                                "reason": "near-duplicate group with conflicting labels"})
        rows = rows[~conflict].reset_index(drop=True)
    return finish(rows, out, seed=seed, fractions=fractions, dropped=dropped)


def _dataset_folder(root: Path) -> Path:
    nested = root / "Dataset_BUSI_with_GT"
    folder = nested if nested.is_dir() else root
    if not any((folder / cls).is_dir() for cls in PATHOLOGIES):
        raise DataError(f"{root} does not look like BUSI: expected folders benign/, malignant/, normal/ "
                        "holding 'benign (1).png' and 'benign (1)_mask.png' etc.")
    return folder


def _scan(root: Path) -> dict[tuple[str, int], list[Path]]:
    """(class, number) -> [image, mask files...] with the image first."""
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for cls in PATHOLOGIES:
        for path in sorted((root / cls).glob("*.png")):
            match = _FILE.match(path.name)
            if match and match["cls"] == cls:
                found.setdefault((cls, int(match["num"])), {})[match["mask"] or ""] = path
    orphans = [str(path) for parts in found.values() if "" not in parts for path in parts.values()]
    if orphans:
        raise DataError(f"mask file(s) without their image: {', '.join(orphans)}; add the image or remove the mask")
    return {key: [parts.pop("")] + [parts[k] for k in sorted(parts)] for key, parts in found.items()}


def _row(cls: str, num: int, files: list[Path], out: Path) -> dict[str, str]:
    image, masks = files[0], files[1:]
    with Image.open(image) as im:
        size = im.size
    mask_file, boxes = "", []
    if masks:
        union = read_mask(masks)
        if union.shape[::-1] == size:
            mask_file = str(masks[0]) if len(masks) == 1 else _write_union(union, out, cls, image)
            boxes = mask_boxes(union) if cls != "normal" else []
    return {
        "image": str(image), "pathology": cls, "boxes": format_boxes(boxes), "mask": mask_file,
        BOXES_MISSING: "1" if cls != "normal" and not boxes else "0",
        "source_file": image.name, "n_mask_files": str(len(masks)),
    }


def _write_union(union: np.ndarray, out: Path, cls: str, image: Path) -> str:
    """Save the union of several mask files, since a manifest row names one mask."""
    path = out / "masks" / cls / f"{image.stem}_mask.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(union.astype("uint8") * 255).save(path)
    return str(path)
