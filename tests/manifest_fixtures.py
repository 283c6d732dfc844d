"""Small on-disk datasets for the manifest and importer tests (PNG files made with numpy/PIL)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The compact public copies (README: ../shared/datasets/ beside the repository).
SHARED_DATASETS = Path(os.environ.get("BUSGEN_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))

IMAGE_W, IMAGE_H = 40, 30


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def noise(seed: int, height: int = IMAGE_H, width: int = IMAGE_W) -> np.ndarray:
    """A random 8-bit image: unrelated to every other seed's (thumbnail correlation ~0)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def rect_mask(height: int, width: int, *rects: tuple[int, int, int, int]) -> np.ndarray:
    """A 0/255 mask with filled rectangles given as pixel (x0, y0, x1, y1), x1/y1 exclusive."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in rects:
        mask[y0:y1, x0:x1] = 255
    return mask


def clean_manifest(root: Path) -> Path:
    """A valid manifest with its images and masks: 5 rows, 4 patients, every optional feature used.

    Rows (1-based): 1-2 patient P1 lesion L1 (two views, benign, train);
    3 P2 malignant with two boxes (val); 4 P3 normal (test); 5 P4 malignant
    flagged boxes_missing (train).
    """
    for i, name in enumerate("abcde"):
        write_png(root / "images" / f"{name}.png", noise(i))
    for name in "abc":
        write_png(root / "masks" / f"{name}.png", rect_mask(IMAGE_H, IMAGE_W, (4, 3, 20, 15)))
    rows = [
        ("images/a.png", "P1", "E1", "L1", "1", "train", "benign", "fibroadenoma", "3", "dev1",
         "[[0.1, 0.1, 0.5, 0.5]]", "masks/a.png", "0"),
        ("images/b.png", "P1", "E1", "L1", "2", "train", "benign", "fibroadenoma", "4a", "dev1",
         "[[0.2, 0.1, 0.6, 0.5]]", "masks/b.png", "0"),
        ("images/c.png", "P2", "E2", "L2", "1", "val", "malignant", "idc", "5", "dev2",
         "[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.8]]", "masks/c.png", "0"),
        ("images/d.png", "P3", "E3", "", "1", "test", "normal", "", "", "dev2", "[]", "", "0"),
        ("images/e.png", "P4", "E4", "L4", "1", "train", "malignant", "", "4c", "dev1", "[]", "", "1"),
    ]
    columns = ["image", "patient_id", "exam_id", "lesion_id", "view", "split", "pathology", "subtype",
               "birads", "device", "boxes", "mask", "boxes_missing"]
    path = root / "manifest.csv"
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def busi_tree(root: Path) -> Path:
    """A downloaded-layout BUSI tree (`root/<class>/<class> (N).png` + `_mask.png`, `_mask_1.png`).

    benign (1): 100x50, lesion at px (20,10,40,20) in `_mask.png`, a second one
    at (60,30,90,40) in `_mask_1.png` and a 3-px speck; benign (2): a
    near-duplicate of benign (1); benign (3) and malignant (2) are the same
    picture under two labels; malignant (1): 80x40, lesion (8,4,40,36);
    normal (1): empty mask.
    """
    base = noise(1, 50, 100)
    write_png(root / "benign" / "benign (1).png", base)
    first = rect_mask(50, 100, (20, 10, 40, 20))
    first[45, 2:5] = 255  # annotation speck, below the size of a lesion
    write_png(root / "benign" / "benign (1)_mask.png", first)
    write_png(root / "benign" / "benign (1)_mask_1.png", rect_mask(50, 100, (60, 30, 90, 40)))
    write_png(root / "benign" / "benign (2).png", np.clip(base.astype(int) + 3, 0, 255))
    write_png(root / "benign" / "benign (2)_mask.png", rect_mask(50, 100, (20, 10, 40, 20)))
    twin = noise(3, 50, 100)
    write_png(root / "benign" / "benign (3).png", twin)
    write_png(root / "benign" / "benign (3)_mask.png", rect_mask(50, 100, (10, 10, 30, 30)))
    write_png(root / "malignant" / "malignant (2).png", twin)
    write_png(root / "malignant" / "malignant (2)_mask.png", rect_mask(50, 100, (10, 10, 30, 30)))
    write_png(root / "malignant" / "malignant (1).png", noise(4, 40, 80))
    write_png(root / "malignant" / "malignant (1)_mask.png", rect_mask(40, 80, (8, 4, 40, 36)))
    write_png(root / "normal" / "normal (1).png", noise(5, 60, 60))
    write_png(root / "normal" / "normal (1)_mask.png", np.zeros((60, 60)))
    return root


def busbra_tree(root: Path, header: str = "ID,Case,Histology,Pathology,BIRADS,Device,Side") -> Path:
    """A downloaded-layout BUS-BRA tree: case 1 benign seen in two views, case 2 malignant."""
    write_png(root / "Images" / "bus_0001-l.png", noise(1, 50, 100))
    write_png(root / "Masks" / "mask_0001-l.png", rect_mask(50, 100, (10, 5, 30, 25)))
    write_png(root / "Images" / "bus_0001-r.png", noise(2, 50, 100))
    write_png(root / "Masks" / "mask_0001-r.png", rect_mask(50, 100, (50, 10, 75, 35)))
    write_png(root / "Images" / "bus_0002-l.png", noise(3, 40, 80))
    write_png(root / "Masks" / "mask_0002-l.png", rect_mask(40, 80, (40, 20, 80, 40)))
    (root / "bus_data.csv").write_text(
        header + "\n"
        "bus_0001-l,1,Fibroadenoma,benign,3,GE Logiq 7,left\n"
        "bus_0001-r,1,Fibroadenoma,benign,3,GE Logiq 7,left\n"
        "bus_0002-l,2,Invasive ductal carcinoma,Malignant,4,Toshiba Aplio 300,right\n"
    )
    return root
