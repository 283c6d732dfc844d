"""bench/gpu.py's batch-size search, with a fake timer and clock (the script itself needs a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu import main, search_batches  # noqa: E402


def per_image(batch: int) -> float:
    """A GPU-like cost: a fixed 1 s launch overhead per call shared by the batch, plus 0.1 s of work per image."""
    return 1.0 / batch + 0.1


def test_doubling_stops_at_the_first_batch_that_gains_under_five_percent():
    probed = search_batches(per_image)
    # 1: 1.1, 2: 0.6, …, 32: 0.13125, 64: 0.115625 (−11.9 %), 128: 0.1078 (−6.8 %), 256: 0.1039 (−3.6 %): stop
    assert list(probed) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert min(probed, key=probed.get) == 256
    assert probed[256] == pytest.approx(1 / 256 + 0.1)


def test_a_batch_that_runs_out_of_memory_ends_the_search_with_what_fitted():
    def timer(batch: int) -> float:
        if batch >= 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return per_image(batch)

    assert list(search_batches(timer)) == [1, 2, 4, 8]


def test_the_search_stops_at_its_deadline():
    now = [0.0]

    def timer(batch: int) -> float:
        now[0] += 10.0  # each probe takes 10 s of the clock
        return per_image(batch)

    assert list(search_batches(timer, deadline=25.0, clock=lambda: now[0])) == [1, 2, 4]


def test_without_a_gpu_it_says_so_in_one_line_and_succeeds(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out
