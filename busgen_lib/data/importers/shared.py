"""The compact copies of BUSI, BUS-UCLM and BrEaST-Lesions-USG (`shared/datasets/<name>/`).

Each folder has `manifest.csv` with pixel boxes (x1/y1 exclusive) on the staged
image of `width` x `height`, and a README listing known problems, which are
handled here (see `import_shared`). Their own columns are kept as extras
(`boxes` as `boxes_px`), plus `dataset`, usable as a domain label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from busgen_lib.data.importers._common import SPLIT_FRACTIONS, finish, pixel_to_relative, subtype_code
from busgen_lib.data.manifest import manifest_path
from busgen_lib.data.schema import BOXES_MISSING, format_boxes, parse_boxes
from busgen_lib.errors import DataError

SHARED_DATASETS = ("busi", "bus_uclm", "breast_lesions_usg")
ALIASES = {"busi_compact": "busi"}  # the CLI's name, to tell it from the downloaded BUSI layout
# BUS-UCLM README: CHVI_005/008/009/013 are pixel-identical to CHCO_000-003, so
# the two prefixes are one patient for splitting.
UCLM_SAME_PATIENT = {"CHVI": "CHCO"}
_CONSUMED = ("image", "mask", "label", "boxes", "birads")


def import_shared(name: str, root: str | Path, out: str | Path, *, keep_label_conflicts: bool = False,
                  keep_exact_duplicates: bool = False, seed: int = 0,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> Path:
    """Write `<out>/manifest.csv` for the compact copy `name` in folder `root`; returns its path.

    Known problems (READMEs): images whose near-duplicate group carries two
    labels (BUSI, 19 images) and exact duplicates (BUSI 1, BUS-UCLM 4) are left
    out unless kept, and listed in `<out>/dropped.csv`. Patients: BUSI's
    `sim_group`, BUS-UCLM's file prefix with CHCO and CHVI merged, BrEaST's
    case. Lesion images without a box (BUS-UCLM HESN_002-005, whose masks could
    not be aligned) keep `boxes_missing=1`. Device is unknown ("") throughout.
    """
    name = ALIASES.get(name, name)
    if name not in SHARED_DATASETS:
        raise ValueError(f"unknown shared dataset {name!r}; choose one of {', '.join(SHARED_DATASETS)}")
    root, out = Path(root).resolve(), Path(out)  # absolute: paths must not depend on the working directory
    table = _read(root)
    frame = pd.concat([_base_rows(table, root, name), _PATIENTS[name](table), _extras(table, root, out)], axis=1)
    drop = _drops(table, keep_label_conflicts, keep_exact_duplicates)
    dropped = pd.DataFrame({"image": [manifest_path(p, out) for p in frame.loc[drop.index, "image"]],
                            "reason": drop.to_numpy()})
    return finish(frame.drop(index=drop.index).reset_index(drop=True), out, seed=seed, fractions=fractions,
                  dropped=dropped)


def _read(root: Path) -> pd.DataFrame:
    path = root / "manifest.csv"
    if not path.is_file():
        raise DataError(f"{path} not found; point the source folder at a compact copy such as shared/datasets/busi")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _base_rows(table: pd.DataFrame, root: Path, name: str) -> pd.DataFrame:
    """Schema fields every copy fills the same way: paths, pathology, relative boxes."""
    boxes = [format_boxes(pixel_to_relative(parse_boxes(b), float(w), float(h)))
             for b, w, h in zip(table["boxes"], table["width"], table["height"])]
    lesion_without_box = (table["label"] != "normal") & (pd.Series(boxes) == "[]")
    return pd.DataFrame({
        "image": [str(root / p) for p in table["image"]],
        "mask": [str(root / p) if p else "" for p in table["mask"]],
        "pathology": table["label"], "boxes": boxes, "device": "", "dataset": name,
        BOXES_MISSING: lesion_without_box.map({True: "1", False: "0"}),
    })


def _busi_patients(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": "busi_g" + table["sim_group"].str.zfill(4)})


def _uclm_patients(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": "bus_uclm_" + table["patient"].replace(UCLM_SAME_PATIENT)})


def _breast_patients(table: pd.DataFrame) -> pd.DataFrame:
    """One image per patient and one lesion per image; histology becomes the subtype code."""
    case = "breast_" + table["case_id"].str.zfill(3)
    return pd.DataFrame({"patient_id": case, "lesion_id": case.where(table["label"] != "normal", ""),
                         "subtype": table["diagnosis"].map(subtype_code), "birads": table["birads"].str.lower()})


_PATIENTS: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "busi": _busi_patients, "bus_uclm": _uclm_patients, "breast_lesions_usg": _breast_patients,
}


def _extras(table: pd.DataFrame, root: Path, out: Path) -> pd.DataFrame:
    """The copy's own columns, kept verbatim (its pixel boxes as `boxes_px`).

    BrEaST's `other_mask` path is re-expressed like `mask`, so that it resolves
    from the new manifest too.
    """
    extras = table.drop(columns=[c for c in _CONSUMED if c in table]).assign(boxes_px=table["boxes"])
    if "other_mask" in extras:
        extras["other_mask"] = [manifest_path(root / p, out) if p else "" for p in extras["other_mask"]]
    return extras


def _drops(table: pd.DataFrame, keep_label_conflicts: bool, keep_exact_duplicates: bool) -> pd.Series:
    """Reason per row to leave out, indexed by the rows concerned."""
    reason = pd.Series("", index=table.index)
    if not keep_exact_duplicates:
        reason[table["exact_dup_of"] != ""] = "exact duplicate"
    if not keep_label_conflicts:
        reason[table["sim_group_label_conflict"] == "1"] = "near-duplicate group with conflicting labels"
    return reason[reason != ""]
