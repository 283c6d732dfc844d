"""Sharded, resumable generation of a plan to image files plus one manifest (DESIGN.md "Scale out").

Layout of an output folder:

    plan.json                      the plan, written at start; a resume must pass the same plan
    settings.json                  everything else that determines an image (model and adapter
                                   fingerprints, sampler, steps, guidance, CPSample, seed, precision); a resume
                                   must pass the same settings
    images/<index:08d>.png         one image per request
    shards/shard-<k>-of-<N>.csv    what shard k has finished, appended batch by batch
    manifest.csv                   all shards merged, sorted by index (`merge_shards`)

Crash safety rests on one ordering: an image is written atomically (temp file +
os.replace) *before* its manifest row is appended and flushed. After a kill a
shard part therefore never lists a missing image; an image without a row is
simply regenerated on resume (same seed, same bytes) and listed. Shard k of N
owns the requests with index % N == k, so shards are disjoint and cover the plan.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm.auto import tqdm

from busgen_lib.atomic import atomic_path, write_text_atomic
from busgen_lib.data.manifest import write_manifest
from busgen_lib.data.schema import BOXES_MISSING, COLUMNS, format_boxes
from busgen_lib.diffusion.plan import Request
from busgen_lib.errors import DataError, UsageError

SampleFn = Callable[[list[Request]], np.ndarray]

PLAN_FILE = "plan.json"
PLAN_FORMAT = "busgen-plan/1"
SETTINGS_FILE = "settings.json"
IMAGE_DIR = "images"
SHARD_DIR = "shards"
MANIFEST_FILE = "manifest.csv"
EXTRA_COLUMNS: tuple[str, ...] = ("index", "seed", "generator")
_SHARD_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.csv")


def shard_path(out_dir: str | Path, shard_index: int, num_shards: int) -> Path:
    """Where shard k of N lists its finished requests."""
    return Path(out_dir) / SHARD_DIR / f"shard-{shard_index}-of-{num_shards}.csv"


# --------------------------------------------------------------------------- generation

def generate(plan: Sequence[Request], sample_fn: SampleFn, out_dir: str | Path, *, batch_size: int,
             shard_index: int = 0, num_shards: int = 1, image_ext: str = "png", progress: bool = True,
             generator: str = "busgen", settings: dict | None = None) -> Path:
    """Generate this shard's part of `plan` into `out_dir`, resuming what a previous run finished.

    `sample_fn(requests)` returns uint8 images (B, H, W) and must honour each
    request's seed, so that a request's image does not depend on its batch.
    `generator` names the model in the manifest's `generator` column.
    `settings` (JSON-able) records everything besides the plan that determines
    an image; a rerun into the same folder with other settings is refused,
    naming the difference, so one manifest never mixes two generators.
    Returns the shard's manifest part; call `merge_shards` once all shards are done.
    """
    if not 0 <= shard_index < num_shards or batch_size < 1:
        raise UsageError(f"need 0 <= shard_index < num_shards and a batch size >= 1, "
                         f"got shard_index={shard_index}, num_shards={num_shards}, batch size {batch_size}")
    _image_format(image_ext)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: the output folder is a file; choose another --out")
    _prepare(out_dir, plan, num_shards, {**(settings or {}), "image_ext": image_ext})
    part = shard_path(out_dir, shard_index, num_shards)
    done = _listed_indices(part)
    mine = [r for r in plan if r.index % num_shards == shard_index]
    todo = [r for r in mine if r.index not in done]
    with tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress, unit="img",
              desc=f"shard {shard_index + 1}/{num_shards}") as bar:
        for batch in _batches(todo, batch_size):
            images = _checked_images(sample_fn(batch), len(batch))
            rows = [_save_image(out_dir, r, image, image_ext, generator) for r, image in zip(batch, images)]
            _append_rows(part, rows)
            bar.update(len(batch))
    return part


def _batches(requests: list[Request], size: int) -> Iterator[list[Request]]:
    for start in range(0, len(requests), size):
        yield requests[start:start + size]


def _image_format(ext: str) -> str:
    """Pillow's format name for a file extension, or a clear error before any sampling."""
    formats = Image.registered_extensions()
    if f".{ext}" not in formats:
        raise UsageError(f"cannot write images as .{ext}; use e.g. png (lossless), tif or jpg")
    return formats[f".{ext}"]


def _checked_images(images: np.ndarray, n: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != n:
        raise ValueError(f"sample_fn returned {images.dtype} images of shape {images.shape} for {n} requests; "
                         f"it must return uint8 grey images of shape ({n}, H, W)")
    return images


def _save_image(out_dir: Path, request: Request, image: np.ndarray, ext: str, generator: str) -> dict:
    """Write one image atomically and return its manifest row."""
    relative = f"{IMAGE_DIR}/{request.index:08d}.{ext}"
    path = out_dir / relative
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=_image_format(ext))
    return _manifest_row(request, relative, generator)


def _manifest_row(request: Request, image: str, generator: str) -> dict:
    """A schema row for a generated image: one synthetic patient per sample, all in the train split."""
    name = f"gen-{request.index}"
    row = dict.fromkeys(COLUMNS, "")
    row.update(image=image, patient_id=name, exam_id=name, lesion_id=name if request.boxes else "", view="0",
               split="train", pathology=request.pathology, birads=request.birads, device=request.device,
               boxes=format_boxes(request.boxes), index=request.index, seed=request.seed, generator=generator)
    if request.birads:  # CoLDiT's lesions come without a box: flagged, as the schema asks of such lesion rows
        row[BOXES_MISSING] = "1"
    return row


def _append_rows(part: Path, rows: list[dict]) -> None:
    """Append rows to a shard part and flush them to disk: a batch counts as done only once listed."""
    header = not part.exists() or part.stat().st_size == 0
    with part.open("a", newline="") as f:
        flag = (BOXES_MISSING,) if BOXES_MISSING in rows[0] else ()  # one kind of request per folder
        pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS, *flag]).to_csv(f, header=header, index=False)
        f.flush()
        os.fsync(f.fileno())


def _listed_indices(part: Path) -> set[int]:
    """Indices a shard part lists, after dropping a row half-written by a kill."""
    if not part.exists():
        return set()
    data = part.read_bytes()
    if data and not data.endswith(b"\n"):
        # A kill mid-append leaves a partial last line; its image is regenerated on resume.
        with part.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    if part.stat().st_size == 0:
        return set()
    return set(pd.read_csv(part, usecols=["index"])["index"].astype(int))


# --------------------------------------------------------------------------- the plan on disk

def _prepare(out_dir: Path, plan: Sequence[Request], num_shards: int, settings: dict) -> None:
    """Create the folder, store the plan and settings (or check they match the stored ones) and the shard layout."""
    _check_indices(plan)
    stored, stored_settings = out_dir / PLAN_FILE, out_dir / SETTINGS_FILE
    # Checked before the plan: a concurrent shard writes the plan before it makes these folders.
    leftovers = (out_dir / SHARD_DIR).exists() or (out_dir / IMAGE_DIR).exists()
    if stored.exists():
        previous = read_plan(out_dir)
        _check_same_plan(previous, plan, stored)
        _check_same_settings(stored_settings, settings)
        if len(plan) > len(previous):  # a grown set: the stored requests are its first ones, kept, not resampled
            write_text_atomic(stored, json.dumps({"format": PLAN_FORMAT, "requests": [r.to_json() for r in plan]}))
    elif leftovers:
        raise UsageError(f"{out_dir}: holds images/ or shards/ but no {PLAN_FILE}; it is not a resumable sampling "
                         "folder, choose a fresh --out")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        # concurrent shards may all write these (identical) files
        write_text_atomic(stored_settings, json.dumps(settings))  # before the plan, which marks the folder as started
        write_text_atomic(stored, json.dumps({"format": PLAN_FORMAT, "requests": [r.to_json() for r in plan]}))
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / SHARD_DIR).mkdir(exist_ok=True)
    _check_shard_layout(out_dir, num_shards)


def _check_same_settings(path: Path, settings: dict) -> None:
    """Refuse to resume with other generation settings; name every difference."""
    if not path.exists():
        raise UsageError(f"{path.parent}: written without a record of its sampling settings ({SETTINGS_FILE}), so "
                         "a resume cannot be checked; choose a fresh --out")
    stored = json.loads(path.read_text())
    given = json.loads(json.dumps(settings))  # the JSON form, as stored (tuples become lists)
    diffs = [f"{k} (stored {stored.get(k)!r}, given {given.get(k)!r})"
             for k in sorted(set(stored) | set(given)) if stored.get(k) != given.get(k)]
    if diffs:
        raise UsageError(f"{path.parent} was sampled with other settings: {'; '.join(diffs)}; rerun with the stored "
                         "settings to resume, or choose a fresh --out")


def _check_indices(plan: Sequence[Request]) -> None:
    for position, r in enumerate(plan):
        if r.index != position:
            raise DataError(f"request at position {position} has index {r.index}; a plan's indices run 0..n-1 "
                            "in order (build it with balanced_plan or explicit_plan)")


def read_plan(out_dir: str | Path) -> list[Request]:
    """The plan stored in an output folder by `generate`."""
    path = Path(out_dir) / PLAN_FILE
    if not path.exists():
        raise DataError(f"{path} not found: {out_dir} is not a sampling output folder")
    data = json.loads(path.read_text())
    if data.get("format") != PLAN_FORMAT:
        raise DataError(f"{path}: not a plan in format {PLAN_FORMAT!r} (found {data.get('format')!r})")
    return [Request.from_json(r) for r in data["requests"]]


def _check_same_plan(stored: list[Request], plan: Sequence[Request], path: Path) -> None:
    """Refuse to mix two plans in one folder; name the first difference so the user sees why.

    A longer plan whose first requests are the stored ones grows the set (a balanced
    plan's request i depends on (seed, i) alone, so a larger --n extends a smaller one)."""
    advice = "pass the same plan (--n, --plan, --seed, --pathologies, --devices) to resume, or use a fresh --out"
    if len(plan) < len(stored):
        raise UsageError(f"{path} holds a plan of {len(stored)} requests but {len(plan)} were given (a set can "
                         f"grow, not shrink); {advice}")
    for old, new in zip(stored, plan):
        old_json, new_json = old.to_json(), new.to_json()  # JSON form: boxes as lists either way
        for field in ("seed", "pathology", "device", "boxes", "birads"):
            if old_json[field] != new_json[field]:
                raise UsageError(f"{path}: request {old.index} differs in {field!r} (stored "
                                 f"{old_json[field]!r}, given {new_json[field]!r}); {advice}")


def _check_shard_layout(out_dir: Path, num_shards: int) -> None:
    """Shard ownership depends on N: resuming with another N would duplicate samples."""
    others = sorted({int(m[2]) for p in (out_dir / SHARD_DIR).iterdir()
                     if (m := _SHARD_NAME.fullmatch(p.name)) and int(m[2]) != num_shards})
    if others:
        raise UsageError(f"{out_dir / SHARD_DIR} holds parts written by {others[0]} processes; resume with "
                         f"{others[0]} processes (`accelerate launch --num_processes {others[0]}`), "
                         "or use a fresh --out")


# --------------------------------------------------------------------------- merging

def merge_shards(out_dir: str | Path) -> Path:
    """Write `out_dir/manifest.csv` from all shard parts, checking every plan index appears exactly once."""
    out_dir = Path(out_dir)
    n = len(read_plan(out_dir))
    parts = sorted((out_dir / SHARD_DIR).glob("shard-*-of-*.csv"))
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in parts if p.stat().st_size > 0]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COLUMNS, *EXTRA_COLUMNS])
    index = df["index"].astype(int)
    _check_complete(index, n, out_dir)
    merged = df.assign(_order=index).sort_values("_order").drop(columns="_order").reset_index(drop=True)
    return write_manifest(merged, out_dir / MANIFEST_FILE)


def _check_complete(index: pd.Series, n: int, out_dir: Path) -> None:
    duplicated = sorted(set(index[index.duplicated()]))
    if duplicated:
        raise DataError(f"{out_dir / SHARD_DIR}: indices listed more than once: {duplicated[:10]}; "
                        "shard parts from different runs were mixed — use a fresh --out")
    missing = sorted(set(range(n)) - set(index))
    if missing:
        raise DataError(f"{out_dir}: {len(missing)} of {n} requests are not generated yet (first: {missing[:10]}); "
                        "rerun the same sample command (same processes) to finish them")
    extra = sorted(set(index) - set(range(n)))
    if extra:
        raise DataError(f"{out_dir / SHARD_DIR}: indices {extra[:10]} are outside the stored plan of {n} requests; "
                        "shard parts from another run were copied in — use a fresh --out")


# --------------------------------------------------------------------------- accelerate

def generate_distributed(plan: Sequence[Request], sample_fn: SampleFn, out_dir: str | Path, batch_size: int,
                         *, cpu: bool = False, **kwargs) -> Path:
    """Under `accelerate launch`: one shard per process, then the main process merges.

    Every process must pass the same plan (build it from the same seed). Extra
    keyword arguments go to `generate`. Returns the merged manifest on every process.
    If the caller made an `Accelerator` already, its state is reused. On CPU-only
    machines launch with `accelerate launch --multi_gpu` (the torchrun launcher;
    `--cpu` alone starts one process) and pass `cpu=True` or set ACCELERATE_USE_CPU=1,
    which `Accelerator` honours and a bare `PartialState` does not.
    """
    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    kwargs.setdefault("progress", state.is_main_process)
    generate(plan, sample_fn, out_dir, batch_size=batch_size, shard_index=state.process_index,
             num_shards=state.num_processes, **kwargs)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_shards(out_dir)
    state.wait_for_everyone()
    return Path(out_dir) / MANIFEST_FILE
