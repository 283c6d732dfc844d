"""BUS-DM and Baseline-CLIP as training callables, the form the analyses and experiments take.

`train_fn("bus-dm", task, profile)(rows, seed)` trains a model and returns its
scoring function (P(positive) per manifest row), so scaling curves, shortcut
tests and the leave-one-dataset-out study run either model through one code path.
With `select_dir`, each training set first gets its learning rate and epochs by
§4.4's cross-validation (once per set; kept in `select_dir`), and every seed
then trains with them: "5-fold cross-validation ... and repeated each
experiment 5 times".
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from busgen_lib.atomic import write_text_atomic
from busgen_lib.data.manifest import rows_fingerprint
from busgen_lib.downstream.classifier import train_classifier
from busgen_lib.downstream.clip_baseline import train_baseline_clip
from busgen_lib.downstream.tasks import Task
from busgen_lib.downstream.training import Trainer, cross_validate
from busgen_lib.errors import UsageError
from busgen_lib.evaluate.training import TrainFn, jsonable
from busgen_lib.profiles import get_downstream

TRAINERS = {"bus-dm": train_classifier, "baseline-clip": train_baseline_clip}


def train_fn(model: str, task: Task, profile: str, *, select_dir: str | Path | None = None,
             **options: Any) -> TrainFn:
    """A `TrainFn` for `model` ("bus-dm" or "baseline-clip"); `options` go to its trainer (lr, epochs, pretrain_df...).

    With `select_dir`, lr and epochs come from cross-validation on each training
    set (`selected`). Its `recipe` (model, task, profile settings, options;
    tables by fingerprint) stamps resumable results, so changing any of them retrains.
    """
    if model not in TRAINERS:
        raise UsageError(f"unknown downstream model {model!r}; choose one of {', '.join(TRAINERS)}")
    trainer = functools.partial(TRAINERS[model], **options)
    recipe = {"model": model, "task": str(task), "profile": profile, "settings": asdict(get_downstream(profile)),
              "options": {k: rows_fingerprint(v) if isinstance(v, pd.DataFrame) else v for k, v in options.items()},
              "select_by_cv": select_dir is not None}

    def fit(rows, seed: int):
        chosen = {} if select_dir is None else selected(trainer, rows, task, profile, select_dir, recipe)
        return trainer(rows, task, profile, seed=seed, **chosen).predict_proba

    fit.recipe = recipe
    if select_dir is not None:  # the choice a study computes once per training set, before its seeds run in parallel
        fit.prepare = lambda rows: selected(trainer, rows, task, profile, select_dir, recipe)
    return fit


def cv_file(select_dir: str | Path, rows: pd.DataFrame) -> Path:
    """Where the cross-validated choice for training set `rows` is kept: named by the rows' fingerprint."""
    return Path(select_dir) / f"cv-{rows_fingerprint(rows)[:16]}.json"


def selected(trainer: Trainer, rows: pd.DataFrame, task: Task, profile: str, select_dir: str | Path,
             recipe: dict) -> dict[str, float]:
    """{"lr", "epochs"} chosen by `cross_validate` on `rows`, computed once per (rows, recipe) and kept as JSON
    (the fold AUCs beside the choice, for the notebook to show)."""
    path = cv_file(select_dir, rows)
    stamp = jsonable(recipe)
    if path.exists() and (saved := json.loads(path.read_text()))["recipe"] == stamp:
        return saved["best"]
    result = cross_validate(trainer, rows, task, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"recipe": stamp, "best": result.best, "n_train": len(rows),
                                        "folds": result.table.to_dict(orient="records")}, indent=1))
    return result.best


def cv_summary(select_dir: str | Path, arms: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The cross-validations kept in `select_dir`: per training set and grid point, mean and sd of the fold AUCs,
    and which point was chosen. With `arms` (name: training rows), only theirs, named: the folder also keeps the
    choices of earlier studies' training sets."""
    if arms is None:
        named = {path: path.stem[3:] for path in sorted(Path(select_dir).glob("cv-*.json"))}
    else:
        named = {cv_file(select_dir, rows): name for name, rows in arms.items()}
    frames = []
    for path, name in named.items():
        if not path.exists():   # an arm not cross-validated (yet)
            continue
        saved = json.loads(path.read_text())
        folds = pd.DataFrame(saved["folds"])
        table = folds.groupby(["lr", "epochs"])["auc"].agg(mean_auc="mean", sd_auc="std", folds="size").reset_index()
        table["chosen"] = (table["lr"] == saved["best"]["lr"]) & (table["epochs"] == saved["best"]["epochs"])
        frames.append(table.assign(training_set=name, n_train=saved["n_train"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
