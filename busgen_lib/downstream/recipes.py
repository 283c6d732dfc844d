"""BUS-DM and Baseline-CLIP as training callables, the form the analyses and experiments take.

`train_fn("bus-dm", task, profile)(rows, seed)` trains a model and returns its
scoring function (P(positive) per manifest row), so scaling curves, shortcut
tests and the leave-one-dataset-out study run either model through one code path.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pandas as pd

from busgen_lib.data.manifest import rows_fingerprint
from busgen_lib.downstream.classifier import train_classifier
from busgen_lib.downstream.clip_baseline import train_baseline_clip
from busgen_lib.downstream.tasks import Task
from busgen_lib.errors import UsageError
from busgen_lib.evaluate.training import TrainFn
from busgen_lib.profiles import get_downstream

TRAINERS = {"bus-dm": train_classifier, "baseline-clip": train_baseline_clip}


def train_fn(model: str, task: Task, profile: str, **options: Any) -> TrainFn:
    """A `TrainFn` for `model` ("bus-dm" or "baseline-clip"); `options` go to its trainer (lr, epochs, pretrain_df...).

    Its `recipe` (model, task, profile settings, options; tables by fingerprint)
    stamps resumable results, so changing any of them retrains.
    """
    if model not in TRAINERS:
        raise UsageError(f"unknown downstream model {model!r}; choose one of {', '.join(TRAINERS)}")
    trainer = TRAINERS[model]

    def fit(rows, seed: int):
        return trainer(rows, task, profile, seed=seed, **options).predict_proba

    fit.recipe = {"model": model, "task": str(task), "profile": profile, "settings": asdict(get_downstream(profile)),
                  "options": {k: rows_fingerprint(v) if isinstance(v, pd.DataFrame) else v for k, v in options.items()}}
    return fit
