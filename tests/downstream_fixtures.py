"""A trivially separable on-disk dataset for the downstream tests: dark benign, bright malignant images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from busgen_lib.data.manifest import write_manifest
from manifest_fixtures import write_png

SIZE = 32


def bright_dark_manifest(root: Path, n_train: int = 32, n_test: int = 16, seed: int = 0) -> Path:
    """Images of mean ~60 (benign) or ~190 (malignant) plus noise, one patient each, split train/test.

    Carries the report attributes of the phantom (shape, margin, orientation,
    echo_pattern, posterior) so that Baseline-CLIP has reports to learn from.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        malignant = i % 2 == 1
        pixels = rng.normal(190 if malignant else 60, 25, (SIZE, SIZE)).clip(0, 255)
        write_png(root / "images" / f"{i:03d}.png", pixels)
        rows.append({
            "image": f"images/{i:03d}.png", "patient_id": f"P{i:03d}", "exam_id": f"E{i:03d}",
            "lesion_id": f"L{i:03d}", "view": "0", "split": "train" if i < n_train else "test",
            "pathology": "malignant" if malignant else "benign", "subtype": "idc" if malignant else "fibroadenoma",
            "birads": "5" if malignant else "3", "device": "dev1", "boxes": "[[0.25, 0.25, 0.75, 0.75]]",
            "mask": "", "shape": "irregular" if malignant else "oval",
            "margin": "spiculated" if malignant else "circumscribed",
            "orientation": "not parallel" if malignant else "parallel", "echo_pattern": "hypoechoic",
            "posterior": "shadowing" if malignant else "enhancement",
        })
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")
