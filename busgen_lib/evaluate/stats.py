"""The paper's statistics (§4.5): bootstrap CIs, Wilson CIs, DeLong's AUC test, permutation tests.

"We estimate the 95% confidence intervals by 1,000 bootstrap replications. We
calculate the two-sided P-values for significance comparisons of sensitivity
and specificity using permutation tests with 10,000 permutations. The P-values
of AUC are calculated using DeLong's test [85, 86]."

Where a maintained implementation exists it is used: scipy.stats.bootstrap for
the percentile bootstrap, statsmodels' proportion_confint for Wilson intervals.
DeLong's test is hand-written (the fast midrank algorithm of Sun & Xu 2014,
ref. 86): neither scipy, statsmodels nor scikit-learn ships it. The permutation
test is hand-written too, because the paper's comparison is of a *metric* of two
readers/models on the same cases and needs exact enumeration for small samples
and a plain |difference| p-value; tests/test_stats.py checks both against
independent references (scikit-learn, Mann–Whitney U, Hanley–McNeil, a large
bootstrap, scipy.stats.permutation_test, exact enumeration, null simulations).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

Metric = Callable[..., float]


# --------------------------------------------------------------------------- confidence intervals

def bootstrap_ci(metric: Metric, *arrays: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 stratify: np.ndarray | None = None) -> tuple[float, float, float]:
    """(estimate, lo, hi): metric on all rows, and the percentile bootstrap CI over resampled rows (§4.5).

    Rows of all `arrays` are resampled together (paired), e.g.
    `bootstrap_ci(roc_auc_score, y_true, score)`. Unstratified, this is
    scipy.stats.bootstrap (method="percentile") over row indices. With
    `stratify` (e.g. the labels, so that every replicate keeps both classes and
    an AUC stays defined), rows are resampled within each stratum with numpy,
    which scipy does not offer.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = _common_length(arrays)
    rng = np.random.default_rng(seed)
    estimate = float(metric(*arrays))

    def on_rows(index: np.ndarray) -> float:
        return float(metric(*(a[index] for a in arrays)))

    if stratify is None:
        result = sps.bootstrap((np.arange(n),), on_rows, n_resamples=n_boot, confidence_level=level,
                               method="percentile", vectorized=False, rng=rng)
        return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)
    strata = [np.flatnonzero(np.asarray(stratify) == s) for s in np.unique(stratify)]
    replicates = np.array([on_rows(np.concatenate([rng.choice(i, size=len(i)) for i in strata]))
                           for _ in range(n_boot)])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(replicates, [100 * alpha, 100 * (1 - alpha)])
    return estimate, float(lo), float(hi)


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(p, lo, hi): a proportion with its Wilson score interval (good coverage even near 0 or 1 and at small n)."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    lo, hi = proportion_confint(int(successes), int(n), alpha=1.0 - level, method="wilson")
    return p, min(float(lo), p), max(float(hi), p)  # at p = 0 or 1 the bound can miss p by rounding


# --------------------------------------------------------------------------- DeLong (Sun & Xu 2014)

def _delong(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance (k, k) for k score rows (k, n) on the same cases.

    Fast version: the structural components come from midranks within the
    positives, within the negatives and over all cases (Sun & Xu 2014, eqs. 11–12).
    """
    y = np.asarray(y_true).astype(bool)
    if y.ndim != 1 or y.all() or not y.any():
        raise ValueError("y_true must be a 1-d array with both classes (1 = positive, 0 = negative)")
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = sps.rankdata(pos, axis=1)                       # midranks among positives
    ty = sps.rankdata(neg, axis=1)                       # midranks among negatives
    tz = sps.rankdata(np.hstack([pos, neg]), axis=1)     # midranks among all
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n                           # per positive: fraction of negatives below it
    v01 = 1.0 - (tz[:, m:] - ty) / m                     # per negative: fraction of positives above it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_ci(y_true: np.ndarray, score: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(auc, lo, hi): the AUC with the Wald interval from DeLong's variance, clipped to [0, 1]."""
    aucs, cov = _delong(y_true, np.asarray(score, dtype=float)[None])
    auc, se = float(aucs[0]), math.sqrt(max(cov[0, 0], 0.0))
    half = sps.norm.ppf(0.5 + level / 2.0) * se
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> tuple[float, float, float, float]:
    """(auc_a, auc_b, z, p): DeLong's two-sided test of equal AUC for two scores on the same cases (§4.5)."""
    aucs, cov = _delong(y_true, np.vstack([score_a, score_b]).astype(float))
    diff = aucs[0] - aucs[1]
    var = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    if var <= 1e-15:  # identical rankings: no evidence of a difference
        return float(aucs[0]), float(aucs[1]), 0.0, 1.0
    z = diff / math.sqrt(var)
    return float(aucs[0]), float(aucs[1]), float(z), float(2.0 * sps.norm.sf(abs(z)))


# --------------------------------------------------------------------------- permutation test

def permutation_test(metric: Metric, a: np.ndarray, b: np.ndarray, n_perm: int = 10_000, seed: int = 0,
                     paired: bool = False) -> float:
    """Two-sided p-value of metric(a) - metric(b) = 0 by permutation (§4.5: 10,000 permutations).

    `paired=True`: rows of `a` and `b` are the same cases (two readers or models
    on one test set, e.g. a = correct-on-positives of model A, b = of model B,
    metric = np.mean for sensitivity); a permutation swaps a case's two values.
    `paired=False`: two independent samples; a permutation reassigns the pooled
    rows to groups of the original sizes. p = share of permutations with
    |difference| >= the observed one, counting the observed labelling itself:
    exact by enumeration when there are at most `n_perm` distinct permutations,
    else (1 + hits) / (1 + n_perm) over random ones.
    """
    a, b = np.asarray(a), np.asarray(b)
    observed = abs(float(metric(a)) - float(metric(b)))
    threshold = observed - 1e-12 * max(1.0, observed)  # float noise must not turn a tie into a miss
    rng = np.random.default_rng(seed)

    if paired:
        n = _common_length((a, b))
        shape = (-1,) + (1,) * (a.ndim - 1)

        def diff(swap: np.ndarray) -> float:
            s = swap.reshape(shape)
            return float(metric(np.where(s, b, a))) - float(metric(np.where(s, a, b)))

        exact = 2 ** n <= n_perm
        draws = (itertools.product((False, True), repeat=n) if exact
                 else (rng.random(n) < 0.5 for _ in range(n_perm)))
        diffs = np.array([diff(np.asarray(s, dtype=bool)) for s in draws])
    else:
        pooled, k = np.concatenate([a, b]), len(a)

        def diff(first: np.ndarray) -> float:
            mask = np.zeros(len(pooled), dtype=bool)
            mask[first] = True
            return float(metric(pooled[mask])) - float(metric(pooled[~mask]))

        exact = math.comb(len(pooled), k) <= n_perm
        draws = (itertools.combinations(range(len(pooled)), k) if exact
                 else (rng.permutation(len(pooled))[:k] for _ in range(n_perm)))
        diffs = np.array([diff(np.asarray(c, dtype=int)) for c in draws])

    hits = int(np.sum(np.abs(diffs) >= threshold))
    return hits / len(diffs) if exact else (1 + hits) / (1 + n_perm)


def _common_length(arrays: tuple[np.ndarray, ...]) -> int:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"paired arrays must have the same number of rows, got lengths {sorted(lengths)}")
    return lengths.pop()
