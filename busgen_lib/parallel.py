"""Independent training jobs on every CPU core: one forked process per job, one torch thread each.

The downstream models are small (64 px inputs under demo), and two intra-op threads keep only part of a
2-core machine busy; a study's (arm, seed) fits are independent, so two single-threaded processes run two
of them at once. Children are forked, so they inherit the job list and the training callable (closures
included) and nothing but a job's index and its result is pickled. Each job writes its own result file
atomically, so a kill loses no finished job, whichever process ran it.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

_WORK: tuple[Sequence[Any], Callable[[Any], Any]] | None = None  # set in the parent just before forking


def default_workers() -> int:
    """Processes for CPU training: every core, or 1 where a GPU trains (children must not share one)."""
    if torch.cuda.is_available():
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _run(index: int) -> Any:
    jobs, work = _WORK
    return work(jobs[index])


def run_jobs(jobs: Sequence[Any], work: Callable[[Any], Any], workers: int | None = None, *,
             progress: bool = False, desc: str = "jobs") -> list[Any]:
    """`[work(job) for job in jobs]`, in order; with more than one worker, in forked processes of one thread."""
    return list(imap_jobs(jobs, work, workers, progress=progress, desc=desc))


def imap_jobs(jobs: Sequence[Any], work: Callable[[Any], Any], workers: int | None = None, *,
              progress: bool = False, desc: str = "jobs") -> Iterator[Any]:
    """`run_jobs` as results arrive (in job order), for a caller that saves each one as soon as it has it."""
    workers = default_workers() if workers is None else workers
    bar = functools.partial(tqdm, total=len(jobs), desc=desc, disable=not progress)
    # inside a pool's worker (a daemon, which may not fork children: e.g. a cross-validation run by a fit): in line
    if workers <= 1 or len(jobs) <= 1 or multiprocessing.current_process().daemon:
        yield from (work(job) for job in bar(jobs))
        return
    global _WORK
    _WORK = (list(jobs), work)
    try:
        # single-threaded children: two OpenMP pools per core would only contend
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs)), initializer=torch.set_num_threads,
                                                      initargs=(1,)) as pool:
            yield from bar(pool.imap(_run, range(len(jobs)), chunksize=1))
    finally:
        _WORK = None
