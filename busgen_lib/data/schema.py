"""The manifest schema of DESIGN.md: one row per image, boxes relative 0..1 as JSON.

Kept apart from validation and I/O so that every module (phantom, importers,
datasets, samplers) speaks the same vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

Box = tuple[float, float, float, float]

# Column order of every manifest we write. `mask` is optional on read.
COLUMNS: tuple[str, ...] = (
    "image", "patient_id", "exam_id", "lesion_id", "view", "split",
    "pathology", "subtype", "birads", "device", "boxes", "mask",
)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c != "mask")

PATHOLOGIES: tuple[str, ...] = ("normal", "benign", "malignant")
# ACR BI-RADS final assessment categories as written in reports (0 = incomplete).
# "4" is category 4 without its a/b/c subdivision, as BUS-BRA and many reports give it.
BIRADS: tuple[str, ...] = ("0", "1", "2", "3", "4", "4a", "4b", "4c", "5", "6")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# The BI-RADS categories a lesion image can be generated for (CoLDiT's classes): the assessments that lead to
# follow-up or biopsy. Their ACR likelihood of malignancy (3: <= 2%, 4a: 2-10%, 4b: 10-50%, 4c: 50-95%,
# 5: >= 95%) gives the pathology a generated image of the category is labelled with: the likelier one.
BIRADS_CLASSES: tuple[str, ...] = ("3", "4a", "4b", "4c", "5")
BIRADS_PATHOLOGY: dict[str, str] = {"3": "benign", "4a": "benign", "4b": "benign", "4c": "malignant",
                                    "5": "malignant"}

# Optional flag column: 1 on a benign/malignant image whose lesion has no box
# (classification-only labels, or a mask that could not be aligned). Validation
# accepts such lesion images without boxes; detection code must exclude them.
BOXES_MISSING = "boxes_missing"


def parse_boxes(text: str) -> list[Box]:
    """Parse the `boxes` JSON field into tuples; raises ValueError with the reason."""
    if text is None or (isinstance(text, float) and text != text) or str(text).strip() == "":
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from None
    if not isinstance(value, list):
        raise ValueError("must be a JSON list of [x0, y0, x1, y1]")
    boxes = []
    for i, box in enumerate(value):
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"box {i} must be a list of four numbers, got {box!r}")
        boxes.append(tuple(float(v) for v in box))
    return boxes


def format_boxes(boxes: Sequence[Sequence[float]]) -> str:
    """Serialise boxes to the manifest's JSON form (6 decimals: sub-pixel at 4K)."""
    return json.dumps([[round(float(v), 6) for v in box] for box in boxes])


def box_problem(box: Box) -> str | None:
    """Why a relative box is invalid, or None when it is fine."""
    x0, y0, x1, y1 = box
    if not all(0.0 <= v <= 1.0 for v in box):
        return f"coordinates outside 0..1: {list(box)}"
    if x0 >= x1:
        return f"x0 >= x1: {list(box)}"
    if y0 >= y1:
        return f"y0 >= y1: {list(box)}"
    return None
