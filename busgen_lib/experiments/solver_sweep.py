"""Which solver, at how many steps? Sample quality against full-chain references from the same seeds.

One trained model, one balanced plan (fixed conditions and seeds), and every
(solver, steps) setting of a grid draws the plan's images. Each setting is
compared with two references drawn from the same seeds:

* the full ancestral chain (DDPM over all T steps, guided), the distribution the
  model defines. The model's chain has T = 500 steps; the 1,000-step grid of the
  stock `DDPMPipeline` in bench/sampling.py is the same process refined and
  unguided, so it cannot stand for guided samples. Measured against it: the
  Fréchet distance in the real-data probe's features and the three
  conditioning-control accuracies (pathology, device, box);
* a converged probability-flow solution (DPM-Solver++ 2M, 100 steps), the image
  a deterministic solver tends to for each seed. The mean per-pixel difference
  from it is the solver's own error. The difference from the ancestral
  reference is reported as well, but it does not vanish with more steps: that
  chain draws fresh noise at every step.

A setting *matches* the reference when its Fréchet distance to the ancestral
samples is at most `fd_margin` times the converged ODE solution's (the floor a
deterministic solver reaches at this n), and each control accuracy lies inside
the reference's 95 % Wilson interval. The knee is the matching setting with
the fewest network evaluations (`knee`). Draws are cached per setting (keyed by the
weights, plan, guidance and setting), so a killed sweep resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from busgen_lib.atomic import atomic_path
from busgen_lib.diffusion.model import BUSGenUNet
from busgen_lib.diffusion.pipeline import sample_images
from busgen_lib.diffusion.plan import Request
from busgen_lib.diffusion.speed import Speed
from busgen_lib.evaluate.control import ControlProbes
from busgen_lib.evaluate.memorisation import ProbeFeatures, frechet_distance


@dataclass(frozen=True)
class Setting:
    """A solver, its step count (network evaluations, each a CFG pair) and the precision they run in."""

    sampler: str
    steps: int
    order: int = 2
    precision: str = "fp32"


SOLVERS = (("dpmsolver++-singlestep", 3), ("dpmsolver++", 2), ("unipc", 2), ("ddim", 1))
DEFAULT_STEPS = (5, 8, 12, 15, 20)
CONVERGED = Setting("dpmsolver++", 100, 2)


def grid(steps: Sequence[int] = DEFAULT_STEPS, solvers: Sequence[tuple[str, int]] = SOLVERS) -> list[Setting]:
    """Every solver at every step count."""
    return [Setting(sampler, n, order) for sampler, order in solvers for n in steps]


def ancestral(model: BUSGenUNet) -> Setting:
    """The full guided DDPM chain of the model: the reference distribution."""
    return Setting("ddpm", int(model.config.num_train_timesteps), 1)


# --------------------------------------------------------------------------- drawing, cached per setting

def _cache_key(model_fingerprint: str, requests: Sequence[Request], guidance: float, setting: Setting) -> str:
    text = json.dumps([model_fingerprint, [r.to_json() for r in requests], guidance, asdict(setting)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def draw(model: BUSGenUNet, requests: Sequence[Request], setting: Setting, guidance: float, cache_dir: str | Path,
         model_fingerprint: str, batch_size: int = 32) -> tuple[torch.Tensor, float]:
    """The plan's images under `setting` ((N, 1, S, S) in [-1, 1], quantised as files are) and the seconds it took.

    The result is kept in `cache_dir` (written atomically); a file whose key does
    not match this model, plan, guidance and setting is drawn again.
    """
    path = Path(cache_dir) / f"{setting.sampler}-o{setting.order}-{setting.steps}-{setting.precision}.pt"
    key = _cache_key(model_fingerprint, requests, guidance, setting)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return cached["images"].float() / 127.5 - 1.0, float(cached["seconds"])
    start = time.perf_counter()
    images = sample_images(model, requests, batch_size=batch_size, progress=False, steps=setting.steps,
                           guidance=guidance, sampler=setting.sampler, order=setting.order,
                           speed=Speed(precision=setting.precision))
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = ((images + 1.0) * 127.5).round().to(torch.uint8)
    with atomic_path(path) as tmp:
        torch.save({"key": key, "images": pixels, "seconds": seconds}, tmp)
    return images, seconds


# --------------------------------------------------------------------------- quality of one setting

def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def plan_frame(requests: Sequence[Request]) -> pd.DataFrame:
    """The requests as a generated manifest's condition columns (what the control probes read)."""
    return pd.DataFrame({"pathology": [r.pathology for r in requests], "device": [r.device for r in requests],
                         "boxes": [json.dumps([list(b) for b in r.boxes]) for r in requests]})


def quality(images: torch.Tensor, requests: Sequence[Request], probes: ControlProbes, reference: torch.Tensor,
            converged: torch.Tensor) -> dict[str, float]:
    """Fréchet distance to the reference samples, control accuracies, mean |difference| in grey levels (0–255)."""
    small = _resize(images, probes.size)
    row = {"frechet_to_reference": frechet_distance(_resize(reference, probes.size), small,
                                                    ProbeFeatures(probes.pathology.model))}
    for result in probes.evaluate(plan_frame(requests), small):
        row[f"{result.name}"] = result.value
    row["grey_diff_to_converged"] = float((images - converged).abs().mean() * 127.5)
    row["grey_diff_to_reference"] = float((images - reference).abs().mean() * 127.5)
    return row


def sweep(model: BUSGenUNet, requests: Sequence[Request], probes: ControlProbes, settings: Sequence[Setting], *,
          guidance: float, cache_dir: str | Path, model_fingerprint: str, batch_size: int = 32,
          progress: bool = True) -> pd.DataFrame:
    """One row per setting (plus the two references): NFE, seconds per image and the quality measures."""
    def run(setting: Setting) -> tuple[torch.Tensor, float]:
        return draw(model, requests, setting, guidance, cache_dir, model_fingerprint, batch_size)

    reference, ref_seconds = run(ancestral(model))
    converged, conv_seconds = run(CONVERGED)
    rows = []
    todo = [(ancestral(model), reference, ref_seconds), (CONVERGED, converged, conv_seconds)]
    for setting in tqdm(settings, desc="solver sweep", unit="setting", disable=not progress):
        todo.append((setting, *run(setting)))
    for setting, images, seconds in todo:
        rows.append({"sampler": setting.sampler, "order": setting.order, "steps": setting.steps,
                     "precision": setting.precision, "nfe": 2 * setting.steps, "seconds_per_image": seconds / len(requests),
                     **quality(images, requests, probes, reference, converged)})
    table = pd.DataFrame(rows)
    table.attrs["reference_controls"] = {r.name: r.ci for r in probes.evaluate(plan_frame(requests),
                                                                              _resize(reference, probes.size))}
    table.attrs["n"] = len(requests)
    return table


# --------------------------------------------------------------------------- the knee

def matches(table: pd.DataFrame, fd_margin: float = 1.25) -> pd.Series:
    """Rows whose samples match the ancestral reference (module docstring's rule)."""
    floor = table.loc[(table["sampler"] == CONVERGED.sampler) & (table["steps"] == CONVERGED.steps),
                      "frechet_to_reference"].iloc[0]
    ok = table["frechet_to_reference"] <= fd_margin * floor
    for name, (lo, hi) in table.attrs["reference_controls"].items():
        ok &= table[name].between(lo, hi)
    return ok


def knee(table: pd.DataFrame, fd_margin: float = 1.25) -> pd.Series:
    """The fp32 matching setting with the fewest network evaluations; references excluded.

    Ties (several solvers match at the same count) go to the smallest per-pixel
    error against the converged solution: unlike seconds, it does not depend on
    how busy the machine was.

    Lower precision is a separate choice of the user (`--precision`): its rows are
    measured against the same rule but never become a profile's default.
    """
    grid_rows = table[(table["sampler"] != "ddpm") & (table["precision"] == "fp32")
                      & ~((table["sampler"] == CONVERGED.sampler) & (table["steps"] == CONVERGED.steps))]
    ok = matches(table, fd_margin).loc[grid_rows.index]
    if not ok.any():
        raise ValueError("no setting of the grid matches the reference; extend the grid to more steps")
    return grid_rows[ok].sort_values(["nfe", "grey_diff_to_converged"]).iloc[0]


def summary(table: pd.DataFrame, fd_margin: float = 1.25) -> pd.DataFrame:
    """The table with a `matches` column, sorted by solver and steps."""
    out = table.assign(matches=matches(table, fd_margin))
    return out.sort_values(["sampler", "steps"], kind="stable").reset_index(drop=True)
