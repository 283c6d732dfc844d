"""The §4.5 statistics against independent references: sklearn, Mann–Whitney, Hanley–McNeil, scipy, exact counts."""

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from busgen_lib.evaluate.stats import (
    _delong, bootstrap_ci, delong_ci, delong_test, permutation_test, proportion_ci,
)


def binormal(rng, n_pos, n_neg, shift=1.0, rho=0.0):
    """Labels and two correlated scores per case; score a separates the classes by `shift` SDs."""
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    common = rng.normal(size=len(y))
    a = shift * y + common
    b = shift * y + rho * common + math.sqrt(1 - rho ** 2) * rng.normal(size=len(y))
    return y, a, b


# --------------------------------------------------------------------------- bootstrap / Wilson

def test_bootstrap_ci_of_a_mean_matches_the_normal_theory_interval():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    est, lo, hi = bootstrap_ci(np.mean, x, n_boot=2000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert est == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_bootstrap_ci_resamples_rows_of_all_arrays_together():
    rng = np.random.default_rng(1)
    y, a, _ = binormal(rng, 150, 150)
    est, lo, hi = bootstrap_ci(roc_auc_score, y, a, n_boot=500, stratify=y)
    assert est == pytest.approx(roc_auc_score(y, a))
    _, dlo, dhi = delong_ci(y, a)
    assert lo == pytest.approx(dlo, abs=0.02) and hi == pytest.approx(dhi, abs=0.02)


def test_stratified_bootstrap_with_one_stratum_agrees_with_scipy_path():
    x = np.random.default_rng(2).exponential(size=300)
    _, lo1, hi1 = bootstrap_ci(np.median, x, n_boot=2000, seed=1)
    _, lo2, hi2 = bootstrap_ci(np.median, x, n_boot=2000, seed=2, stratify=np.zeros(len(x)))
    width = hi1 - lo1
    assert abs(lo1 - lo2) < 0.15 * width and abs(hi1 - hi2) < 0.15 * width


def test_bootstrap_ci_is_deterministic_per_seed():
    x = np.random.default_rng(3).normal(size=50)
    assert bootstrap_ci(np.mean, x, seed=5) == bootstrap_ci(np.mean, x, seed=5)
    assert bootstrap_ci(np.mean, x, seed=5) != bootstrap_ci(np.mean, x, seed=6)


def test_proportion_ci_is_the_wilson_interval():
    p, lo, hi = proportion_ci(8, 10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert p == 0.8 and lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert proportion_ci(0, 20)[1] == 0.0 and proportion_ci(20, 20)[2] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in proportion_ci(0, 0))


# --------------------------------------------------------------------------- DeLong

@pytest.mark.parametrize("ties", [False, True])
def test_delong_auc_equals_sklearn_and_mann_whitney(ties):
    rng = np.random.default_rng(4)
    y, a, b = binormal(rng, 37, 58, rho=0.5)
    if ties:
        a, b = np.round(a), np.round(b * 2) / 2
    auc_a, auc_b, _, _ = delong_test(y, a, b)
    assert auc_a == pytest.approx(roc_auc_score(y, a)) and auc_b == pytest.approx(roc_auc_score(y, b))
    u = sps.mannwhitneyu(a[y == 1], a[y == 0]).statistic
    assert auc_a == pytest.approx(u / (37 * 58))
    assert delong_ci(y, a)[0] == pytest.approx(auc_a)


def test_delong_variance_agrees_with_hanley_mcneil_and_a_large_bootstrap():
    rng = np.random.default_rng(5)
    y, a, _ = binormal(rng, 300, 300, shift=1.2)
    aucs, cov = _delong(y, a[None])
    auc, var = aucs[0], cov[0, 0]
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    hanley = (auc * (1 - auc) + 299 * (q1 - auc ** 2) + 299 * (q2 - auc ** 2)) / (300 * 300)
    assert var == pytest.approx(hanley, rel=0.25)  # HM assumes exponential scores: a ballpark only
    pos, neg = a[y == 1], a[y == 0]
    boot = []
    for _ in range(3000):  # stratified bootstrap; AUC by the rank-sum formula (checked against sklearn above)
        s_pos, s_neg = rng.choice(pos, 300), rng.choice(neg, 300)
        ranks = sps.rankdata(np.r_[s_pos, s_neg])
        boot.append((ranks[:300].sum() - 300 * 301 / 2) / (300 * 300))
    assert var == pytest.approx(np.var(boot, ddof=1), rel=0.10)


def test_delong_pvalues_are_uniform_under_the_null():
    rng = np.random.default_rng(6)
    p = np.array([delong_test(*binormal(rng, 30, 40, shift=1.0, rho=0.6))[3] for _ in range(1500)])
    assert sps.kstest(p, "uniform").pvalue > 0.01
    rejections = int((p < 0.05).sum())
    lo, hi = sps.binom.ppf([0.0005, 0.9995], len(p), 0.05)
    assert lo <= rejections <= hi


def test_delong_detects_a_real_difference():
    rng = np.random.default_rng(7)
    y, a, _ = binormal(rng, 200, 200, shift=1.5)
    noisy = a + rng.normal(scale=2.0, size=len(a))
    auc_a, auc_b, z, p = delong_test(y, a, noisy)
    assert auc_a > auc_b and z > 0 and p < 1e-3


def test_delong_identical_scores_give_p_one_and_bad_labels_raise():
    y, a, _ = binormal(np.random.default_rng(8), 20, 20)
    assert delong_test(y, a, a)[2:] == (0.0, 1.0)
    with pytest.raises(ValueError, match="both classes"):
        delong_test(np.ones(10), a[:10], a[:10])


def test_delong_ci_covers_the_true_auc_at_the_nominal_rate():
    rng = np.random.default_rng(9)
    true_auc = sps.norm.cdf(1.0 / math.sqrt(2))  # binormal, unit variances, shift 1
    covered = 0
    for _ in range(400):
        y, a, _ = binormal(rng, 50, 50, shift=1.0)
        _, lo, hi = delong_ci(y, a)
        covered += lo <= true_auc <= hi
    assert 0.91 <= covered / 400 <= 0.98


# --------------------------------------------------------------------------- permutation test

def _mc_tolerance(p, n=10_000):
    return 4 * math.sqrt(2 * max(p * (1 - p), 1e-4) / n)


def test_paired_permutation_test_matches_scipy():
    rng = np.random.default_rng(10)
    truth = rng.random(80) < 0.5
    a = (rng.random(80) < np.where(truth, 0.85, 0.6)).astype(float)  # correct-or-not of reader A
    b = (rng.random(80) < np.where(truth, 0.75, 0.6)).astype(float)  # reader B, same cases
    ours = permutation_test(np.mean, a, b, paired=True)
    ref = sps.permutation_test((a, b), lambda x, y: x.mean() - y.mean(), permutation_type="samples",
                               n_resamples=10_000, vectorized=False, rng=np.random.default_rng(0)).pvalue
    assert ours == pytest.approx(ref, abs=_mc_tolerance(ref))


def test_unpaired_permutation_test_matches_scipy():
    rng = np.random.default_rng(11)
    a, b = rng.normal(0.4, 1, size=40), rng.normal(0.0, 1, size=40)
    ours = permutation_test(np.mean, a, b)
    ref = sps.permutation_test((a, b), lambda x, y: x.mean() - y.mean(), n_resamples=10_000,
                               vectorized=False, rng=np.random.default_rng(0)).pvalue
    assert ours == pytest.approx(ref, abs=_mc_tolerance(ref))


def test_permutation_test_is_exact_for_small_samples():
    # 5 cases, reader A right on all, B wrong on all: of 2^5 swaps only "none" and "all" reach |diff| = 1.
    a, b = np.ones(5), np.zeros(5)
    assert permutation_test(np.mean, a, b, paired=True) == pytest.approx(2 / 32)
    ref = sps.permutation_test((a, b), lambda x, y: x.mean() - y.mean(), permutation_type="samples").pvalue
    assert ref == pytest.approx(2 / 32)
    # unpaired 3 vs 3 fully separated: 2 of C(6,3) = 20 splits are as extreme.
    assert permutation_test(np.mean, np.array([5., 6, 7]), np.array([1., 2, 3])) == pytest.approx(2 / 20)
    # Monte Carlo with many cases agrees with the exact value within its error.
    mc = permutation_test(np.mean, np.r_[np.ones(5), np.zeros(9)], np.zeros(14), paired=True, n_perm=10_000)
    assert mc == pytest.approx(2 / 32, abs=_mc_tolerance(2 / 32))


def test_permutation_test_on_2d_rows_swaps_whole_cases():
    # rows = (label, prediction): sensitivity of two models on the same positive and negative cases.
    rng = np.random.default_rng(12)
    y = rng.random(60) < 0.5
    pa = np.where(rng.random(60) < 0.9, y, ~y)
    pb = np.where(rng.random(60) < 0.9, y, ~y)

    def sensitivity(rows):
        return rows[rows[:, 0] == 1, 1].mean()

    p = permutation_test(sensitivity, np.c_[y, pa].astype(int), np.c_[y, pb].astype(int), paired=True, n_perm=2000)
    assert 0.0 < p <= 1.0
    # under the null (B is A) nothing differs
    assert permutation_test(sensitivity, np.c_[y, pa].astype(int), np.c_[y, pa].astype(int), paired=True,
                            n_perm=200) == 1.0
