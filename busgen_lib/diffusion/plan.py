"""Generation plans: the deterministic list of what to generate, one request per sample (§4.3.2).

A plan fixes, for every sample index, the conditions (pathology, device, boxes)
and the sampler seed before any model runs. Everything about request i derives
from (seed, i) alone, so request i is the same whatever the plan length, shard
or batch: a killed run resumes exactly and N workers agree without talking.

Category balance (the paper samples "category-balanced") comes from cycling
through the pathology x device cells so that every prefix of a plan is as
balanced as it can be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from busgen_lib.data.dataset import derive_seed
from busgen_lib.data.schema import BIRADS_CLASSES, BIRADS_PATHOLOGY, PATHOLOGIES, Box, box_problem, parse_boxes
from busgen_lib.diffusion.box_prior import BoxPrior
from busgen_lib.errors import DataError, UsageError

BOX_STREAM = 1      # third key of a request's box rng, so it never shares a stream with the sampler seed
MAX_REPORTED = 20   # problems listed in one error; the rest are counted


@dataclass(frozen=True)
class Request:
    """One sample to generate: its index in the plan, sampler seed and conditions."""

    index: int
    seed: int
    pathology: str
    device: str
    boxes: list[Box]
    birads: str = ""  # the BI-RADS category a CoLDiT request asks for (BUSGen's requests leave it empty)

    def to_json(self) -> dict:
        return {"index": self.index, "seed": self.seed, "pathology": self.pathology,
                "device": self.device, "boxes": [list(box) for box in self.boxes], "birads": self.birads}

    @classmethod
    def from_json(cls, data: dict) -> Request:
        return cls(int(data["index"]), int(data["seed"]), str(data["pathology"]), str(data["device"]),
                   [tuple(float(v) for v in box) for box in data["boxes"]], str(data.get("birads", "")))


def request_seed(seed: int, index: int) -> int:
    """The sampler seed of request `index`: a function of (plan seed, index) only."""
    return derive_seed(seed, index)


# --------------------------------------------------------------------------- validation

def _raise_problems(what: str, problems: list[str]) -> None:
    """DataError whose first line names the first problem (the CLI's one line); the others follow below."""
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{what}: {problems[0]} ({len(problems)} problem(s) in all)\n  "
                        + "\n  ".join(problems[:MAX_REPORTED]) + more)


def _condition_problems(where: str, pathology: str, device: str, devices: Sequence[str]) -> list[str]:
    problems = []
    if pathology not in PATHOLOGIES:
        problems.append(f"{where}, pathology: unknown {pathology!r}; use one of {', '.join(PATHOLOGIES)}")
    if device not in devices:
        problems.append(f"{where}, device: unknown {device!r}; the model knows {', '.join(devices)}")
    return problems


def _box_problems(where: str, pathology: str, boxes: Sequence[Box]) -> list[str]:
    if pathology == "normal" and boxes:
        return [f"{where}, boxes: a normal image has no lesion boxes, got {len(boxes)}; remove them"]
    return [f"{where}, boxes: box {k} has {why}; boxes are relative x0, y0, x1, y1 in 0..1"
            for k, box in enumerate(boxes) if (why := box_problem(box)) is not None]


def validate_plan(plan: Sequence[Request], devices: Sequence[str]) -> None:
    """Raise ValueError naming every bad request and field, before a model spends time on it."""
    problems = []
    for position, r in enumerate(plan):
        where = f"request {r.index}"
        if r.index != position:
            problems.append(f"{where}, index: found at position {position}; plans are indexed 0..n-1 in order")
        problems += _condition_problems(where, r.pathology, r.device, devices)
        problems += _box_problems(where, r.pathology, r.boxes)
        if r.pathology in PATHOLOGIES and r.pathology != "normal" and not r.boxes:
            problems.append(f"{where}, boxes: a {r.pathology} request needs at least one lesion box")
    _raise_problems("the generation plan", problems)


def _check_choices(name: str, chosen: Sequence[str], known: Sequence[str]) -> None:
    shown = ", ".join(k if k else "'' (no device)" for k in known)  # the empty name is the null condition
    if not chosen:
        raise UsageError(f"no {name} given; choose from {shown}")
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise UsageError(f"unknown {name} {', '.join(map(repr, unknown))}; choose from {shown}")


def _check_prior_covers(box_prior: BoxPrior | None, pathologies: Sequence[str], where: str) -> None:
    needed = sorted({p for p in pathologies if p != "normal"})
    have = box_prior.pathologies if box_prior is not None else ()
    missing = [p for p in needed if p not in have]
    if missing:
        raise UsageError(f"{where} need lesion boxes for {', '.join(missing)} but "
                         + ("no box prior was given" if box_prior is None else
                            f"the model's box prior only has {', '.join(have) or 'no pathologies'}")
                         + "; request only those pathologies (sample --pathologies), or give explicit boxes "
                           "in a --plan CSV")


# --------------------------------------------------------------------------- balanced plans

def balanced_cell(index: int, n_pathologies: int, n_devices: int) -> tuple[int, int]:
    """(pathology, device) position of request `index`, cycling through all cells.

    Pathology and device each step by one per request, so every prefix is balanced
    in both marginals; when the two counts share a factor, each block of
    lcm(P, D) requests shifts the device by one to reach the cells not yet visited.
    Any P*D consecutive requests visit every cell once.
    """
    block = index // math.lcm(n_pathologies, n_devices)
    shift = block % math.gcd(n_pathologies, n_devices)
    return index % n_pathologies, (index + shift) % n_devices


def balanced_plan(n: int, pathologies: Sequence[str], devices: Sequence[str], box_prior: BoxPrior | None,
                  seed: int = 0, *, known_devices: Sequence[str] | None = None) -> list[Request]:
    """`n` requests balanced over pathology x device, boxes from `box_prior`, seed per index.

    `known_devices` is the model's device vocabulary (default: `devices` itself);
    every name is checked before any box is drawn.
    """
    if n < 1 or seed < 0:
        raise UsageError(f"a balanced plan needs --n >= 1 images and --seed >= 0, got n={n}, seed={seed}")
    _check_choices("pathologies", pathologies, PATHOLOGIES)
    _check_choices("devices", devices, known_devices if known_devices is not None else devices)
    _check_prior_covers(box_prior, pathologies, "the requested pathologies")
    return [_balanced_request(i, pathologies, devices, box_prior, seed) for i in range(n)]


def _balanced_request(index: int, pathologies: Sequence[str], devices: Sequence[str],
                      box_prior: BoxPrior | None, seed: int) -> Request:
    p, d = balanced_cell(index, len(pathologies), len(devices))
    pathology = pathologies[p]
    boxes = _prior_boxes(box_prior, pathology, seed, index)
    return Request(index, request_seed(seed, index), pathology, devices[d], boxes)


def _prior_boxes(box_prior: BoxPrior | None, pathology: str, seed: int, index: int) -> list[Box]:
    """Boxes for one request from its own rng, so they do not depend on other requests."""
    if pathology == "normal":
        return []
    return box_prior.sample(pathology, 1, np.random.default_rng([seed, index, BOX_STREAM]))[0]


def birads_plan(n: int, categories: Sequence[str] = BIRADS_CLASSES, seed: int = 0) -> list[Request]:
    """`n` CoLDiT requests cycling through the BI-RADS `categories` (every prefix balanced), seed per index.

    Each is labelled with its category's likelier pathology (schema.BIRADS_PATHOLOGY); CoLDiT places no boxes.
    """
    if n < 1 or seed < 0:
        raise UsageError(f"a BI-RADS plan needs --n >= 1 images and --seed >= 0, got n={n}, seed={seed}")
    _check_choices("BI-RADS categories", categories, BIRADS_CLASSES)
    return [Request(i, request_seed(seed, i), BIRADS_PATHOLOGY[b], "", [], b)
            for i, b in ((i, categories[i % len(categories)]) for i in range(n))]


def explicit_birads_plan(path: str | Path, seed: int = 0) -> list[Request]:
    """CoLDiT requests from a CSV with a `birads` column (one of BIRADS_CLASSES per row) and optionally `seed`."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the plan table ({err}); it is a CSV with a birads column") from None
    if "birads" not in df.columns or df.empty:
        raise DataError(f"{path}: a CoLDiT plan lists one request per row in a birads column "
                        f"(found columns: {', '.join(map(str, df.columns)) or 'none'}, {len(df)} rows)")
    problems, requests = [], []
    for i in range(len(df)):
        birads = df["birads"].iloc[i].strip().lower()
        if birads not in BIRADS_CLASSES:
            problems.append(f"row {i + 1}, birads: {df['birads'].iloc[i]!r} is not one of {', '.join(BIRADS_CLASSES)}")
            continue
        try:
            own = _row_seed(df["seed"].iloc[i]) if "seed" in df.columns else None
        except ValueError:
            problems.append(f"row {i + 1}, seed: {df['seed'].iloc[i]!r} is not a non-negative integer")
            continue
        requests.append(Request(i, own if own is not None else request_seed(seed, i), BIRADS_PATHOLOGY[birads],
                                "", [], birads))
    _raise_problems(str(path), problems)
    return requests


# --------------------------------------------------------------------------- explicit plans

def explicit_plan(rows: pd.DataFrame | str | Path, devices: Sequence[str], seed: int = 0,
                  box_prior: BoxPrior | None = None) -> list[Request]:
    """Requests from a table (CSV path or DataFrame) with columns pathology, device and optionally boxes, seed.

    Row k (1-based, as a spreadsheet counts below the header) becomes request k-1.
    A lesion row with empty boxes gets boxes from `box_prior`; a `seed` column
    overrides the derived per-index seed. Every row is checked before any work.
    """
    name = "the plan table" if isinstance(rows, pd.DataFrame) else str(rows)
    try:
        df = rows if isinstance(rows, pd.DataFrame) else pd.read_csv(rows, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise DataError(f"{rows}: cannot read the plan table ({err}); it is a CSV with pathology, device "
                        "and optionally boxes, seed columns") from None
    missing = [c for c in ("pathology", "device") if c not in df.columns]
    if missing:
        raise DataError(f"{name}: plan table lacks column(s) {', '.join(missing)}; it needs pathology, device "
                        f"and optionally boxes, seed (found: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise DataError(f"{name}: the plan table has no rows; list one request per row")
    parsed, problems = _parse_rows(df, devices)
    _raise_problems(name, problems)
    _check_prior_covers(box_prior, [p for p, boxes, _ in parsed if not boxes], "rows without boxes")
    return [Request(i, s if s is not None else request_seed(seed, i), p, str(df["device"].iloc[i]),
                    boxes or _prior_boxes(box_prior, p, seed, i))
            for i, (p, boxes, s) in enumerate(parsed)]


def _parse_rows(df: pd.DataFrame, devices: Sequence[str]) -> tuple[list[tuple[str, list[Box], int | None]], list[str]]:
    """(pathology, boxes, seed or None) per row, and every problem found."""
    parsed, problems = [], []
    for i in range(len(df)):
        row, where = df.iloc[i], f"row {i + 1}"
        pathology = str(row["pathology"]).strip().lower()
        problems += _condition_problems(where, pathology, str(row["device"]), devices)
        boxes, seed = [], None
        try:
            boxes = _row_boxes(row.get("boxes", ""))
            problems += _box_problems(where, pathology, boxes)
        except ValueError as err:
            problems.append(f"{where}, boxes: {err}; expected a JSON list like [[x0, y0, x1, y1]] in 0..1")
        try:
            seed = _row_seed(row.get("seed", ""))
        except ValueError:
            problems.append(f"{where}, seed: {row.get('seed')!r} is not a non-negative integer")
        parsed.append((pathology, boxes, seed))
    return parsed, problems


def _row_boxes(value: object) -> list[Box]:
    """Boxes from a table cell: JSON text (CSV) or a list of 4-sequences (DataFrame)."""
    if isinstance(value, (list, tuple)):
        return [tuple(float(v) for v in box) for box in value]
    return parse_boxes(value)


def _row_seed(value: object) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    seed = int(str(value).strip())
    if seed < 0:
        raise ValueError(seed)
    return seed
