"""Small studies for the reader-study tests: two phantom sets play "real" and "generated"."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.data.phantom import write_phantom
from busgen_lib.reader_study.create import CreatedStudy, create_study

N_PER_SOURCE = 3


def phantom_pair(root: Path) -> tuple[Path, Path]:
    """(real manifest, generated manifest): 6 phantom images each at 32 px, different seeds."""
    return (write_phantom(root / "real", n=6, size=32, seed=1, progress=False),
            write_phantom(root / "generated", n=6, size=32, seed=2, progress=False))


def with_model_output(manifest: Path, out: Path) -> Path:
    """A copy of a manifest with a `model_birads` column (what a model said about each image)."""
    df = read_manifest(manifest)
    df["model_birads"] = ["4b" if p == "malignant" else "3" for p in df["pathology"]]
    return write_manifest(df, out)


def turing_study(root: Path, pair: tuple[Path, Path], readers=("alice", "bob"), seed: int = 0) -> CreatedStudy:
    real, generated = pair
    return create_study(root / "study", list(readers), real=[real], generated=[generated],
                        n_per_source=N_PER_SOURCE, seed=seed)


def form_of(html: str) -> dict[str, str]:
    """The hidden fields (position, image_id, stage) of a reader page."""
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', html))


def export_frame(text: str) -> pd.DataFrame:
    from io import StringIO

    return pd.read_csv(StringIO(text), dtype=str, keep_default_na=False)
