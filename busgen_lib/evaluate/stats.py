"""The paper's statistics (§4.5): bootstrap CIs, Wilson CIs, DeLong's AUC test, permutation tests,
and the comparison of arms trained with several seeds.

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
independent references (scikit-learn, Mann–Whitney U, a direct DeLong from its
structural components, a large bootstrap, scipy.stats.permutation_test, exact
enumeration, null simulations).

A test on one trained model per arm covers only test-set noise; where arms are
trained with several seeds, `compare_seeded_arms` tests across seeds (training
noise) and keeps DeLong's test of the seed-averaged scores as a secondary number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from busgen_lib.errors import DataError, UsageError

Metric = Callable[..., float]


class DegenerateTestError(DataError):
    """A test whose statistic is undefined on these data (e.g. DeLong's variance of a non-zero difference is 0)."""


# --------------------------------------------------------------------------- confidence intervals

def bootstrap_ci(metric: Metric, *arrays: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 stratify: np.ndarray | None = None) -> tuple[float, float, float]:
    """(estimate, lo, hi): metric on all rows, and the percentile bootstrap CI over resampled rows (§4.5).

    Rows of all `arrays` are resampled together (paired). Unstratified, this is
    scipy.stats.bootstrap (method="percentile") over row indices. With
    `stratify`, rows are resampled within each stratum with numpy (scipy does
    not offer it): a two-class metric needs `stratify=y_true`, e.g.
    `bootstrap_ci(roc_auc_score, y_true, score, stratify=y_true)` (or `auc_ci`),
    because an unstratified resample of a small set can miss a class. A metric
    that is undefined (NaN) on the data or on any replicate is an error that
    says so, never a NaN interval.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = _common_length(arrays)
    rng = np.random.default_rng(seed)
    name = getattr(metric, "__name__", "the metric")
    estimate = float(metric(*arrays))
    if not math.isfinite(estimate):
        raise DataError(f"{name} is undefined ({estimate}) on the {n} rows given: no interval can be computed")

    def on_rows(index: np.ndarray) -> float:
        return float(metric(*(a[index] for a in arrays)))

    if stratify is None:
        result = sps.bootstrap((np.arange(n),), on_rows, n_resamples=n_boot, confidence_level=level,
                               method="percentile", vectorized=False, rng=rng)
        replicates = result.bootstrap_distribution
    else:
        strata = [np.flatnonzero(np.asarray(stratify) == s) for s in np.unique(stratify)]
        replicates = np.array([on_rows(np.concatenate([rng.choice(i, size=len(i)) for i in strata]))
                               for _ in range(n_boot)])
    bad = int((~np.isfinite(replicates)).sum())
    if bad:
        hint = ("pass stratify=y_true (or use auc_ci) so that every resample keeps both classes"
                if stratify is None else "the metric is undefined on some resample even within strata")
        raise DataError(f"{bad} of {n_boot} bootstrap replicates of {name} on {n} rows are undefined (NaN), e.g. a "
                        f"resample without one class: {hint}")
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
    _check_two_classes(np.asarray(y_true).astype(int))
    y = np.asarray(y_true).astype(bool)
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
    """(auc, lo, hi): the AUC with the Wald interval from DeLong's variance, clipped to [0, 1].

    A normal approximation: it has zero width at AUC 0 or 1 and can be short for
    small sets. The paper's intervals are bootstrap ones: `auc_ci` (default).
    """
    aucs, cov = _delong(y_true, np.asarray(score, dtype=float)[None])
    auc, se = float(aucs[0]), math.sqrt(max(cov[0, 0], 0.0))
    half = sps.norm.ppf(0.5 + level / 2.0) * se
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def auc_ci(y_true: np.ndarray, score: np.ndarray, method: Literal["bootstrap", "delong"] = "bootstrap",
           n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(auc, lo, hi): the AUC with its CI; by default the paper's, 1,000 bootstrap replicates (§4.5).

    The bootstrap resamples positives and negatives separately (stratified), so
    every replicate has both classes and the AUC stays defined. `method="delong"`
    gives DeLong's Wald interval (`delong_ci`), fast but a normal approximation.
    """
    y = np.asarray(y_true).astype(int)
    if method == "delong":
        return delong_ci(y, score, level)
    if method != "bootstrap":
        raise UsageError(f"auc_ci: method must be 'bootstrap' or 'delong', got {method!r}")
    _check_two_classes(y)
    return bootstrap_ci(rank_auc, y, np.asarray(score, dtype=float), n_boot=n_boot, level=level, seed=seed, stratify=y)


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                degenerate: Literal["raise", "permutation"] = "raise", n_perm: int = 10_000,
                seed: int = 0) -> tuple[float, float, float, float]:
    """(auc_a, auc_b, z, p): DeLong's two-sided test of equal AUC for two scores on the same cases (§4.5).

    When DeLong's variance of the difference is 0 the test is undefined: with
    equal AUCs (e.g. identical rankings) there is no difference and p = 1; with
    different AUCs (e.g. a perfect score against a constant one, 1.0 vs 0.5, where
    every case's structural components differ by the same amount) z would be
    infinite on no evidence of its spread. Then `degenerate="raise"` raises
    `DegenerateTestError`, and `degenerate="permutation"` returns z = nan and the
    p of `auc_permutation_test` (paired, rank-based) instead.
    """
    aucs, cov = _delong(y_true, np.vstack([score_a, score_b]).astype(float))
    diff = aucs[0] - aucs[1]
    var = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    if var <= 1e-15:
        if abs(diff) <= 1e-12:  # the same AUC and no spread of the difference: nothing to test
            return float(aucs[0]), float(aucs[1]), 0.0, 1.0
        if degenerate == "permutation":
            p = auc_permutation_test(y_true, score_a, score_b, n_perm=n_perm, seed=seed)
            return float(aucs[0]), float(aucs[1]), math.nan, p
        raise DegenerateTestError(
            f"DeLong's test is undefined here: AUCs {aucs[0]:.4f} and {aucs[1]:.4f} differ, but the variance of their "
            f"difference is 0 (e.g. a perfect or a constant score). Use auc_permutation_test(y_true, score_a, score_b) "
            f"or delong_test(..., degenerate='permutation')")
    z = diff / math.sqrt(var)
    return float(aucs[0]), float(aucs[1]), float(z), float(2.0 * sps.norm.sf(abs(z)))


def auc_permutation_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, n_perm: int = 10_000,
                         seed: int = 0) -> float:
    """Two-sided p of equal AUC for two scores on the same cases, by swapping each case's two ranks.

    Bandos, Rockette & Gur (2005): each score is replaced by its rank over all
    cases, so scores on different scales are exchangeable under the null; exact
    by enumeration for up to log2(n_perm) cases. Valid where DeLong's normal
    approximation is not (zero variance, very small sets).
    """
    y = np.asarray(y_true).astype(int)
    _check_two_classes(y)
    rank_a, rank_b = (sps.rankdata(np.asarray(s, dtype=float)) for s in (score_a, score_b))

    def auc_of_rows(rows: np.ndarray) -> float:
        return rank_auc(rows[:, 0], rows[:, 1])

    return permutation_test(auc_of_rows, np.c_[y, rank_a], np.c_[y, rank_b], n_perm=n_perm, seed=seed, paired=True)


def rank_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """The AUC as the Mann–Whitney statistic (midranks for ties); NaN without both classes."""
    y = np.asarray(y_true).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return math.nan
    ranks = sps.rankdata(score)
    return float((ranks[y].sum() - m * (m + 1) / 2.0) / (m * n))


def _check_two_classes(y: np.ndarray) -> None:
    if y.ndim != 1 or not set(np.unique(y)) == {0, 1}:
        raise DataError(f"y_true must be a 1-d array with both classes (1 = positive, 0 = negative), "
                        f"got values {sorted(set(np.unique(y).tolist()))[:5]}")


# --------------------------------------------------------------------------- arms trained with several seeds

def compare_seeded_arms(y_true: np.ndarray, arm_scores: Mapping[str, Sequence[np.ndarray]],
                        reference: str | None = None, level: float = 0.95) -> pd.DataFrame:
    """Compare training arms (e.g. real, generated, cleaned) each trained with the same several seeds.

    `arm_scores` maps an arm to its per-seed scores on one test set
    (`arm_scores[arm][k]` from seed k, the same seeds in every arm, so seed k
    pairs arms). One trained model per arm lets DeLong's p cover only test-set
    noise; here the unit of replication is the training run. One row per arm:

    - `n_seeds`, `auc_mean`, `auc_sd` (ddof 1), `auc_min`, `auc_max` of the per-seed AUCs;
    - against `reference` (default: the first arm), on the per-seed AUC
      differences: `diff_mean` with its t-based `diff_ci_lo`/`diff_ci_hi` at
      `level`, `t_p` (paired t-test, scipy.stats.ttest_rel) and `wilcoxon_p`
      (signed-rank, scipy.stats.wilcoxon; with n seeds it cannot go below
      2 / 2**n, e.g. 0.25 for 3, so read it as a robustness check);
    - secondary: `ensemble_auc` of the seed-averaged scores and `ensemble_delong_p`
      against the reference's ensemble (DeLong, or the rank permutation test when
      DeLong is degenerate; `ensemble_p_method` says which), test-set noise only.

    When every per-seed difference is 0, both paired p-values are 1 (scipy's
    t-test would return NaN on zero spread).
    """
    y = np.asarray(y_true).astype(int)
    _check_two_classes(y)
    arms = {name: [np.asarray(s, dtype=float) for s in scores] for name, scores in arm_scores.items()}
    if not arms:
        raise UsageError("compare_seeded_arms needs at least one arm")
    reference = next(iter(arms)) if reference is None else reference
    if reference not in arms:
        raise UsageError(f"reference arm {reference!r} is not among the arms {list(arms)}")
    seeds = {name: len(scores) for name, scores in arms.items()}
    if len(set(seeds.values())) != 1 or min(seeds.values()) < 2:
        raise UsageError(f"every arm needs the same number (>= 2) of seeds to be compared across seeds, got {seeds}")
    for name, scores in arms.items():
        for k, s in enumerate(scores):
            if s.shape != y.shape:
                raise DataError(f"arm {name!r}, seed {k}: {s.shape[0] if s.ndim else 0} scores for {len(y)} test cases")
    aucs = {name: np.array([rank_auc(y, s) for s in scores]) for name, scores in arms.items()}
    ensembles = {name: np.mean(scores, axis=0) for name, scores in arms.items()}
    rows = []
    for name, a in aucs.items():
        row = {"arm": name, "n_seeds": len(a), "auc_mean": a.mean(), "auc_sd": a.std(ddof=1), "auc_min": a.min(),
               "auc_max": a.max(), "ensemble_auc": rank_auc(y, ensembles[name])}
        if name != reference:
            row |= paired_differences(a, aucs[reference], level)
            _, _, z, p = delong_test(y, ensembles[name], ensembles[reference], degenerate="permutation")
            row |= {"ensemble_delong_p": p, "ensemble_p_method": "permutation" if math.isnan(z) else "delong"}
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs |= {"reference": reference, "level": level, "n_test": len(y), "n_test_positive": int(y.sum())}
    return table


def paired_differences(auc: np.ndarray, ref: np.ndarray, level: float) -> dict[str, float]:
    """Mean paired difference (e.g. AUC per seed or per fold) with its t CI, paired t-test p and Wilcoxon p."""
    diff = auc - ref
    if np.all(diff == 0):
        return {"diff_mean": 0.0, "diff_ci_lo": 0.0, "diff_ci_hi": 0.0, "t_p": 1.0, "wilcoxon_p": 1.0}
    t = sps.ttest_rel(auc, ref)
    ci = t.confidence_interval(confidence_level=level)
    return {"diff_mean": float(diff.mean()), "diff_ci_lo": float(ci.low), "diff_ci_hi": float(ci.high),
            "t_p": float(t.pvalue), "wilcoxon_p": float(sps.wilcoxon(auc, ref).pvalue)}


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
