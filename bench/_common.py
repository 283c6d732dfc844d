"""Helpers shared by the benchmarks in bench/ (not a benchmark: run alone, it does nothing).

Rule of the project: speed is measured, not assumed. A benchmark times its
subject and a peer in the same run, on the same weights and machine, and
prints the ratio; the absolute numbers only say what machine it was.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of `fn`, synchronised on both ends."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_of_interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device
                        ) -> dict[str, list[float]]:
    """Time every `fn` once per round, in turn, for `rounds` rounds; returns each one's seconds per round.

    Interleaving makes peers share the same moments of a busy machine; the minimum
    of the rounds is the least disturbed time (other load only ever adds time).
    """
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, device))
    return seconds


def environment(device: torch.device) -> dict[str, object]:
    """What the numbers depend on: the machine, its load, the thread count and the library versions."""
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": f"{device.type}: {name}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def print_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> None:
    """A plain fixed-width table of `rows` restricted to `columns`."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(name: str, data: dict[str, object]) -> Path:
    """Write results to runs/bench/<name>.json (the README's tables are copied from there)."""
    path = REPO / "runs" / "bench" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
