"""Create a study folder: a balanced, blinded image set, one private token per reader, one shuffled queue each.

Blinding (what a reader could otherwise learn the truth from): every image is
re-encoded as an 8-bit grayscale PNG (no file name, metadata, colour or bit
depth of its source survives) under a random id; real and generated images
must have the same sizes, or `size` resamples all of them to one. The truth
(source, pathology, BI-RADS, original path) stays in the study's SQLite file,
which only the organiser's export reads.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from busgen_lib.data.manifest import read_manifest, resolve
from busgen_lib.data.pixels import unit_grayscale
from busgen_lib.errors import DataError, UsageError
from busgen_lib.reader_study.questions import BIRADS, QUESTIONS, TURING
from busgen_lib.reader_study.store import IMAGE_FOLDER, Study, now

READER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 256 random bits, 43 URL-safe characters
MAX_SIZE = 2048


@dataclass(frozen=True)
class CreatedStudy:
    """What the organiser needs: the folder, their own token and each reader's private token."""

    folder: Path
    organiser_token: str
    reader_tokens: dict[str, str]
    n_images: int


def reader_path(token: str) -> str:
    """The path of a reader's private link (prefix it with the server's address)."""
    return f"/r/{token}"


def organiser_path(token: str) -> str:
    return f"/o/{token}"


def _rows(paths: list[str | Path], source: str, model_column: str | None) -> pd.DataFrame:
    frames = []
    for path in paths:
        df = read_manifest(path)
        if model_column:
            if model_column not in df.columns:
                raise DataError(f"{path}: no column {model_column!r} with the model's output; "
                                f"it has {', '.join(df.columns)}")
            empty = np.flatnonzero((df[model_column].astype(str).str.strip() == "").to_numpy())
            if len(empty):
                raise DataError(f"{path}: row {empty[0] + 1}: {model_column}: empty; every image needs the "
                                "model's output to show")
        frames.append(pd.DataFrame({
            "path": [str(resolve(df, "image", i)) for i in range(len(df))],
            "source": source, "pathology": df["pathology"].astype(str), "birads": df["birads"].astype(str),
            "model_output": df[model_column].astype(str) if model_column else ""}))
    return pd.concat(frames, ignore_index=True)


def _check_options(out: Path, real: list, generated: list, readers: list[str], question: str,
                   n_per_source: int | None, model_column: str | None, size: int | None) -> None:
    if question not in QUESTIONS:
        raise UsageError(f"question {question!r} unknown; use one of {', '.join(QUESTIONS)}")
    if question == TURING and not (real and generated):
        raise UsageError("a visual Turing test needs real and generated manifests (--real and --generated)")
    if not real and not generated:
        raise UsageError("give at least one manifest (--real and/or --generated)")
    if model_column and question != BIRADS:
        raise UsageError("a second answer after the model's output (--model-column) is for the birads question")
    if not readers:
        raise UsageError("name at least one reader (--reader NAME, repeated)")
    bad = [r for r in readers if not READER_NAME.fullmatch(r)]
    if bad:
        raise UsageError(f"reader name {bad[0]!r}: use 1-40 letters, digits, '_', '.', '-'")
    if len(set(readers)) != len(readers):
        raise UsageError("reader names must be unique")
    if n_per_source is not None and n_per_source < 1:
        raise UsageError(f"--n-per-source must be at least 1, got {n_per_source}")
    if size is not None and not 8 <= size <= MAX_SIZE:
        raise UsageError(f"--size must be between 8 and {MAX_SIZE} pixels, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: the study folder must be new or empty; choose another --out")


def _select(real: pd.DataFrame, generated: pd.DataFrame, n_per_source: int | None, seed: int) -> pd.DataFrame:
    """n images of each source (all of the smaller source by default), drawn with the seed: a balanced set."""
    sources = [df for df in (real, generated) if not df.empty]
    available = min(len(df) for df in sources)
    n = available if n_per_source is None else n_per_source
    if n > available:
        raise UsageError(f"--n-per-source {n}: only {available} image(s) in the smaller source")
    rng = np.random.default_rng(seed)
    return pd.concat([df.iloc[np.sort(rng.choice(len(df), n, replace=False))] for df in sources], ignore_index=True)


def _blinded(path: str, size: int | None) -> Image.Image:
    """The image as the reader sees it: 8-bit grayscale pixels only, optionally resampled to size x size."""
    try:
        with Image.open(path) as im:
            pixels = unit_grayscale(im, path)
    except OSError as err:
        raise DataError(f"{path}: cannot read the image ({err})") from None
    image = Image.fromarray(np.round(pixels * 255.0).astype(np.uint8))
    return image if size is None else image.resize((size, size), Image.Resampling.BICUBIC)


def create_study(out: str | Path, readers: list[str], real: list[str | Path] = (),
                 generated: list[str | Path] = (), question: str = TURING, n_per_source: int | None = None,
                 model_column: str | None = None, size: int | None = None, seed: int = 0,
                 title: str = "Reader study") -> CreatedStudy:
    """Write a new study folder (`study.sqlite` + `images/`) from project manifests of real and generated images.

    `question` is "turing" (real or generated, with a confidence 1-5) or "birads" (2, 3, 4a, 4b, 4c, 5), the
    latter optionally answered a second time after the model's output in `model_column` of the manifests is
    shown (the paper's assisted reading, §2.5). Each reader gets the same images in their own order.
    """
    out = Path(out)
    real, generated = list(real), list(generated)
    _check_options(out, real, generated, readers, question, n_per_source, model_column, size)
    empty = pd.DataFrame(columns=["path", "source", "pathology", "birads", "model_output"])
    chosen = _select(_rows(real, "real", model_column) if real else empty,
                     _rows(generated, "generated", model_column) if generated else empty, n_per_source, seed)
    images = [_blinded(p, size) for p in chosen["path"]]
    sizes = {s: sorted({im.size for im, src in zip(images, chosen["source"]) if src == s}) for s in ("real", "generated")}
    if sizes["real"] and sizes["generated"] and sizes["real"] != sizes["generated"]:
        raise UsageError(f"real images are {sizes['real'][:3]} px and generated {sizes['generated'][:3]} px "
                         "(width, height): the size would give the answer away; pass --size N to resample all")

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / IMAGE_FOLDER).mkdir(parents=True)
    ids = [secrets.token_hex(8) for _ in images]
    for image_id, image in zip(ids, images):
        image.save(partial / IMAGE_FOLDER / f"{image_id}.png", format="PNG")
    organiser = secrets.token_urlsafe(TOKEN_BYTES)
    tokens = {reader: secrets.token_urlsafe(TOKEN_BYTES) for reader in readers}
    settings = {"question": question, "model_column": model_column, "title": title, "seed": seed,
                "organiser_token": organiser, "created_at": now(), "size": size}
    study = Study(partial, create=True)
    with study.db:
        study.db.execute("BEGIN")
        study.db.executemany("INSERT INTO settings VALUES (?, ?)", [(k, json.dumps(v)) for k, v in settings.items()])
        study.db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
                             [(i, r.source, r.pathology, r.birads, r.path, r.model_output)
                              for i, r in zip(ids, chosen.itertuples())])
        study.db.executemany("INSERT INTO readers VALUES (?, ?)", tokens.items())
        for k, reader in enumerate(readers):
            order = np.random.default_rng([seed, k + 1]).permutation(len(ids))  # own order per reader
            study.db.executemany("INSERT INTO queue (reader, position, image_id) VALUES (?, ?, ?)",
                                 [(reader, pos, ids[j]) for pos, j in enumerate(order)])
    study.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    study.close()
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return CreatedStudy(out, organiser, tokens, len(ids))
