"""Write the phantom dataset: PNG images and masks plus a schema manifest.

Manifest columns: schema COLUMNS, then the target lesion's BI-RADS descriptors
(shape, margin, orientation, echo_pattern, posterior, halo, calcifications),
aln_positive (1/0 for malignant, empty otherwise), the probe pose
(probe_angle in degrees, probe_offset as a fraction of width) and
relative_area: the summed area of the image's lesion boxes as a fraction of
the image (the box-based lesion size, computable for real data too), and the
patient's presentation ("screening" or "symptomatic", cohort.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from busgen_lib.data.manifest import write_manifest
from busgen_lib.data.phantom.cohort import Patient, View, plan_patient
from busgen_lib.data.phantom.lesions import Lesion
from busgen_lib.data.phantom.render import render_image
from busgen_lib.data.phantom.scene import build_scene
from busgen_lib.data.schema import BIRADS, COLUMNS, format_boxes
from busgen_lib.data.splits import assign_splits
from busgen_lib.data.devices import get_device
from busgen_lib.errors import UsageError

DESCRIPTOR_COLUMNS: tuple[str, ...] = (
    "shape", "margin", "orientation", "echo_pattern", "posterior", "halo", "calcifications",
)
EXTRA_COLUMNS: tuple[str, ...] = (*DESCRIPTOR_COLUMNS, "aln_positive", "probe_angle", "probe_offset", "relative_area",
                                 "presentation")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
# Bump whenever the images, labels or columns a (n, size, seed) produces change: `catalog` stamps the datasets
# it renders with this version and renders again when it differs, so no run reuses a phantom of older rules.
# 2: patients carry a `presentation` (screening-detected lesions smaller and less often malignant).
PHANTOM_VERSION = 2
NORMAL_BIRADS = "1"
# Below 32 px a lesion is drawn a pixel or two wide and its box is quantised to 1/size steps (at 7 px every
# box is one of a handful of cells); 32 px is also the smallest resolution any profile trains at.
MIN_SIZE = 32


def label_boxes(labels: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Relative [x0, y0, x1, y1] box of each label 1..K (pixel edges, so x1 = (last col + 1) / W)."""
    h, w = labels.shape
    return [(sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h)
            for sl in ndimage.find_objects(labels) if sl is not None]


def _image_name(patient: Patient, view: View) -> str:
    finding = "N" if view.target is None else f"L{view.target + 1}"
    return f"{patient.exam_id(view.exam)}_{finding}_v{view.index:02d}.png"


def _birads(patient: Patient, view: View, visible: list[Lesion]) -> str:
    """The most severe category any visible lesion got at this exam."""
    if not visible:
        return NORMAL_BIRADS
    index = {lesion.lesion_id: k for k, lesion in enumerate(patient.lesions)}
    ratings = [patient.birads[index[lesion.lesion_id]][view.exam] for lesion in visible]
    return max(ratings, key=BIRADS.index)


def _row(patient: Patient, view: View, visible: list[Lesion], boxes: list, name: str) -> dict:
    target = visible[0] if visible else None
    row = {
        "image": f"images/{name}", "patient_id": patient.patient_id, "exam_id": patient.exam_id(view.exam),
        "lesion_id": target.lesion_id if target else "", "view": view.index, "split": "",
        "pathology": target.pathology if target else "normal", "subtype": target.subtype if target else "",
        "birads": _birads(patient, view, visible), "device": patient.devices[view.exam],
        "boxes": format_boxes(boxes), "mask": f"masks/{name}",
    }
    for column in DESCRIPTOR_COLUMNS:
        row[column] = target.descriptors[column] if target else ""
    row["aln_positive"] = "" if target is None or target.aln_positive is None else int(target.aln_positive)
    row["probe_angle"] = round(view.azimuth_deg, 1)
    row["probe_offset"] = round(view.offset, 3) + 0.0  # no "-0.0"
    row["relative_area"] = round(sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes), 6)
    row["presentation"] = patient.presentation
    return row


def render_view(patient: Patient, number: int, size: int, seed: int, patient_index: int,
                ) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """(image uint8, lesion label map uint8, visible lesions) of the patient's view `number`.

    Each view has its own random stream (seed, patient, view), so it renders
    the same whatever else is rendered.
    """
    view = patient.views[number]
    rng = np.random.default_rng([seed, patient_index, 1 + number])
    scene, visible = build_scene(patient, view, size, rng)
    image = render_image(scene, get_device(patient.devices[view.exam]), rng)
    return image, scene.labels, visible


def iter_patients(n: int, seed: int):
    """Patients of the cohort, in order, until exactly n views are planned."""
    remaining, index = n, 0
    while remaining > 0:
        patient = plan_patient(index, seed, remaining)
        yield index, patient
        remaining -= len(patient.views)
        index += 1


DATASET_PARTS = ("manifest.csv", "images", "masks")


def _check_fresh_out(out: Path, replace: bool) -> None:
    """Refuse to write into a file or over a dataset (a smaller rerun would leave the old images orphaned);
    with `replace`, remove the old dataset first instead."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: --out must be a folder, but a file of that name exists; choose another --out")
    taken = [name for name in DATASET_PARTS if (out / name).exists()]
    if taken and not replace:
        raise UsageError(f"{out} already holds a dataset ({', '.join(taken)}); choose a new --out or delete it first")
    for name in taken:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()


def write_phantom(out: Path, n: int, size: int = 128, seed: int = 0, progress: bool = True,
                  replace: bool = False) -> Path:
    """Render n phantom images (size x size) with masks and manifest under `out`; return the manifest path.

    Same seed, same bytes: every patient and every view has its own seeded
    random stream. Splits are by patient (`assign_splits`), seeded the same.
    A folder that already holds a dataset is refused, or with `replace` its
    images, masks and manifest are removed first (never a mix of two renders).
    """
    if n < 1:
        raise UsageError(f"--n must be a positive number of images, got {n}")
    if size < MIN_SIZE:
        raise UsageError(f"--size {size} is too small for the phantom's lesions to be resolved; use at least "
                         f"{MIN_SIZE} px")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    out = Path(out)
    _check_fresh_out(out, replace)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    with tqdm(total=n, disable=not progress, desc="phantom", unit="img") as bar:
        for index, patient in iter_patients(n, seed):
            for number, view in enumerate(patient.views):
                image, labels, visible = render_view(patient, number, size, seed, index)
                name = _image_name(patient, view)
                Image.fromarray(image).save(out / "images" / name)
                Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8)).save(out / "masks" / name)
                rows.append(_row(patient, view, visible, label_boxes(labels), name))
                bar.update()
    manifest = assign_splits(pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS]), SPLIT_FRACTIONS, seed)
    return write_manifest(manifest, out / "manifest.csv")
