"""The contract between the analyses (scaling curves, shortcut tests, subgroups) and any classifier.

Analyses take a *training callable* instead of a model, so that BUS-DM,
Baseline-CLIP or a test's toy rule run through the same code:
`TrainFn(train_rows, seed) -> ScoreFn`, `ScoreFn(rows) -> P(positive) per row`.
The rows are manifest rows (image paths resolve against `df.attrs["root"]`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from busgen_lib.errors import UsageError

ScoreFn = Callable[[pd.DataFrame], np.ndarray]
TrainFn = Callable[[pd.DataFrame, int], ScoreFn]
SEED_LIMIT = 2**31   # seeds handed to a TrainFn fit every RNG API (np.random.seed takes < 2**32)


def probabilities(score_fn: ScoreFn, rows: pd.DataFrame) -> np.ndarray:
    """P(positive) of each row from `score_fn`, checked: one finite value in [0, 1] per row."""
    p = np.asarray(score_fn(rows), dtype=float).reshape(-1)
    if len(p) != len(rows):
        raise UsageError(f"the score function returned {len(p)} values for {len(rows)} rows; it must give "
                         "one P(positive) per row")
    if not np.all(np.isfinite(p)) or p.min(initial=0.0) < 0.0 or p.max(initial=1.0) > 1.0:
        raise UsageError("the score function must return probabilities in [0, 1] (e.g. a softmax or sigmoid), "
                         f"got values from {np.nanmin(p):.4g} to {np.nanmax(p):.4g}")
    return p


def recipe_of(train_fn: TrainFn) -> dict[str, Any]:
    """What a TrainFn says it trains (its `recipe` attribute: model, profile, settings), as JSON would store it.

    Resumable results are stamped with it, so a changed backbone or setting
    never reuses scores of the old one; a plain callable has the empty recipe.
    """
    return jsonable(getattr(train_fn, "recipe", {}))


def jsonable(value: Any) -> Any:
    """`value` as it comes back from JSON (tuples as lists, odd objects as strings): comparable with a stored stamp."""
    return json.loads(json.dumps(value, default=str))
