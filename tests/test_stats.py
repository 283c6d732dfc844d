"""The §4.5 statistics against independent references: sklearn, Mann–Whitney, a direct DeLong, scipy, exact counts."""

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.stats import (
    DegenerateTestError, _delong, auc_ci, auc_permutation_test, bootstrap_ci, compare_seeded_arms, delong_ci,
    delong_test, permutation_test, proportion_ci,
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


SMALL_Y = np.array([0, 0, 0, 1, 1, 1])
SMALL_SCORE = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.9])  # AUC 7/9


def test_unstratified_bootstrap_of_a_two_class_metric_on_a_small_set_refuses_instead_of_nan():
    # 6 rows: a resample holds one class with probability 2/64, so some of 1,000 replicates have no AUC.
    with pytest.raises(DataError, match=r"replicates of roc_auc_score .* undefined .*stratify=y_true"):
        bootstrap_ci(roc_auc_score, SMALL_Y, SMALL_SCORE)
    with pytest.raises(DataError, match="undefined"):
        bootstrap_ci(roc_auc_score, np.ones(4), np.arange(4.0))  # undefined on the data itself


def test_stratified_auc_bootstrap_matches_the_exact_bootstrap_distribution():
    # Within classes there are 3^3 x 3^3 equally likely resamples: enumerate them for the exact percentiles.
    pos, neg = SMALL_SCORE[SMALL_Y == 1], SMALL_SCORE[SMALL_Y == 0]
    exact = np.array([np.mean([(p > q) + 0.5 * (p == q) for p in pos[list(i)] for q in neg[list(j)]])
                      for i in np.ndindex(3, 3, 3) for j in np.ndindex(3, 3, 3)])
    est, lo, hi = auc_ci(SMALL_Y, SMALL_SCORE, n_boot=4000, seed=3)
    assert est == pytest.approx(7 / 9)
    assert np.quantile(exact, 0.015) <= lo <= np.quantile(exact, 0.035)
    assert np.quantile(exact, 0.965) <= hi <= np.quantile(exact, 0.985)
    assert auc_ci(SMALL_Y, SMALL_SCORE, n_boot=200, seed=3) == bootstrap_ci(roc_auc_score, SMALL_Y, SMALL_SCORE,
                                                                          n_boot=200, seed=3, stratify=SMALL_Y)


def test_auc_ci_offers_delong_and_rejects_unknown_methods():
    y, a, _ = binormal(np.random.default_rng(13), 40, 40)
    assert auc_ci(y, a, method="delong") == delong_ci(y, a)
    with pytest.raises(UsageError, match="'bootstrap' or 'delong'"):
        auc_ci(y, a, method="wald")


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


def slow_delong(y, scores):
    """DeLong et al. (1988) straight from the definition: every positive-negative pair, no ranks."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]

    def psi(x, z):
        return (x > z) + 0.5 * (x == z)

    v10 = np.array([[psi(p, r_neg).mean() for p in r_pos] for r_pos, r_neg in zip(pos, neg)])
    v01 = np.array([[psi(r_pos, q).mean() for q in r_neg] for r_pos, r_neg in zip(pos, neg)])
    return v10.mean(axis=1), np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]


def test_fast_delong_equals_the_direct_pairwise_definition_with_ties():
    rng = np.random.default_rng(14)
    y, a, b = binormal(rng, 23, 31, rho=0.4)
    scores = np.vstack([np.round(a, 1), np.round(b, 1)])  # many ties
    aucs, cov = _delong(y, scores)
    ref_aucs, ref_cov = slow_delong(y, scores)
    assert aucs == pytest.approx(ref_aucs, abs=1e-12) and cov == pytest.approx(ref_cov, abs=1e-12)
    z = (ref_aucs[0] - ref_aucs[1]) / math.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert delong_test(y, *scores)[2:] == pytest.approx((z, 2 * sps.norm.sf(abs(z))))


def test_delong_variance_of_a_hand_case():
    # positives 0.9, 0.4; negatives 0.5, 0.1. V10 = (1, 1/2), V01 = (1/2, 1): AUC 3/4,
    # var = var(V10)/2 + var(V01)/2 = 0.125/2 + 0.125/2 = 1/8.
    y, s = np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1])
    aucs, cov = _delong(y, s[None])
    assert aucs[0] == pytest.approx(0.75) and cov[0, 0] == pytest.approx(0.125)
    half = sps.norm.ppf(0.975) * math.sqrt(0.125)
    assert delong_ci(y, s) == pytest.approx((0.75, 0.75 - half, 1.0))


def test_delong_zero_variance_with_different_aucs_is_an_error_or_a_permutation_test():
    # perfect vs constant: AUC 1.0 vs 0.5, and every case's components differ by the same amount (variance 0).
    y = np.array([1, 1, 1, 0, 0, 0])
    perfect, constant = y.astype(float), np.zeros(6)
    with pytest.raises(DegenerateTestError, match=r"1.0000 and 0.5000 differ.*auc_permutation_test"):
        delong_test(y, perfect, constant)
    # Swapping the ranks of s_p positives and s_n negatives gives |ΔAUC| = 0.5 |1 - (s_p + s_n)/3|,
    # which reaches the observed 0.5 only for no swap and all swaps: 2 of 2^6.
    auc_a, auc_b, z, p = delong_test(y, perfect, constant, degenerate="permutation")
    assert (auc_a, auc_b) == (1.0, 0.5) and math.isnan(z) and p == pytest.approx(2 / 64)
    assert auc_permutation_test(y, perfect, constant) == pytest.approx(2 / 64)


def test_auc_permutation_test_matches_scipy_on_ranks():
    rng = np.random.default_rng(15)
    y, a, b = binormal(rng, 30, 30, rho=0.3)
    b = 5 * b + 100  # another scale: ranks make the swap fair
    ra, rb = sps.rankdata(a), sps.rankdata(b)

    def auc(x):  # the rank-sum AUC (equal to sklearn's, checked above), fast enough for 10,000 resamples
        return (sps.rankdata(x)[y == 1].sum() - 30 * 31 / 2) / (30 * 30)

    def stat(x, z):
        return auc(x) - auc(z)

    ref = sps.permutation_test((ra, rb), stat, permutation_type="samples", n_resamples=10_000, vectorized=False,
                               rng=np.random.default_rng(0)).pvalue
    assert auc_permutation_test(y, a, b) == pytest.approx(ref, abs=_mc_tolerance(ref))


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

def _mc_tolerance(p, n=10_000):  # 4 SE of the difference of two Monte Carlo p-values
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

    p = permutation_test(sensitivity, np.c_[y, pa].astype(int), np.c_[y, pb].astype(int), paired=True)
    # Swapping a negative case changes nothing, so this is the paired test of the positives' predictions alone;
    # a test that swapped label and prediction separately would not match it.
    ref = sps.permutation_test((pa[y].astype(float), pb[y].astype(float)), lambda u, v: u.mean() - v.mean(),
                               permutation_type="samples", n_resamples=10_000, vectorized=False,
                               rng=np.random.default_rng(0)).pvalue
    assert p == pytest.approx(ref, abs=_mc_tolerance(ref))
    # under the null (B is A) nothing differs
    assert permutation_test(sensitivity, np.c_[y, pa].astype(int), np.c_[y, pa].astype(int), paired=True,
                            n_perm=200) == 1.0


# --------------------------------------------------------------------------- arms trained with several seeds

def seeded_arms(rng, y, shifts, n_seeds):
    """Per arm, n_seeds score vectors: the arm's class shift plus seed noise (a stand-in for training noise)."""
    return {name: [shift * y + rng.normal(size=len(y)) for _ in range(n_seeds)] for name, shift in shifts.items()}


def test_compare_seeded_arms_matches_scipy_paired_tests_across_seeds():
    rng = np.random.default_rng(16)
    y = np.r_[np.ones(60, int), np.zeros(60, int)]
    arms = seeded_arms(rng, y, {"real": 1.2, "generated": 0.8, "cleaned": 1.1}, n_seeds=5)
    table = compare_seeded_arms(y, arms).set_index("arm")
    auc = {k: np.array([roc_auc_score(y, s) for s in v]) for k, v in arms.items()}
    assert table.attrs["reference"] == "real" and table.loc["real", "n_seeds"] == 5
    assert table.loc["generated", ["auc_mean", "auc_sd", "auc_min", "auc_max"]].tolist() == pytest.approx(
        [auc["generated"].mean(), auc["generated"].std(ddof=1), auc["generated"].min(), auc["generated"].max()])
    for arm in ("generated", "cleaned"):
        d = auc[arm] - auc["real"]
        half = sps.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
        row = table.loc[arm]
        assert row[["diff_mean", "diff_ci_lo", "diff_ci_hi"]].tolist() == pytest.approx([d.mean(), d.mean() - half,
                                                                                          d.mean() + half])
        assert row["t_p"] == pytest.approx(sps.ttest_rel(auc[arm], auc["real"]).pvalue)
        assert row["wilcoxon_p"] == pytest.approx(sps.wilcoxon(d).pvalue)
        ens, ens_ref = np.mean(arms[arm], axis=0), np.mean(arms["real"], axis=0)
        assert row["ensemble_auc"] == pytest.approx(roc_auc_score(y, ens))
        assert row["ensemble_delong_p"] == pytest.approx(delong_test(y, ens, ens_ref)[3])
        assert row["ensemble_p_method"] == "delong"
    assert table.loc["generated", "diff_ci_hi"] < 0  # 0.8 vs 1.2 SDs of class separation: the CI excludes 0
    assert math.isnan(table.loc["real", "t_p"])  # the reference is not compared with itself


def test_compare_seeded_arms_with_identical_arms_reports_no_difference():
    rng = np.random.default_rng(17)
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    scores = seeded_arms(rng, y, {"a": 1.0}, n_seeds=3)["a"]
    row = compare_seeded_arms(y, {"a": scores, "b": [s.copy() for s in scores]}).set_index("arm").loc["b"]
    assert row[["diff_mean", "t_p", "wilcoxon_p", "ensemble_delong_p"]].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_compare_seeded_arms_refuses_unpaired_or_single_seeds():
    y = np.r_[np.ones(5, int), np.zeros(5, int)]
    s = np.arange(10.0)
    with pytest.raises(UsageError, match=r"same number \(>= 2\) of seeds.*'a': 2, 'b': 3"):
        compare_seeded_arms(y, {"a": [s, s], "b": [s, s, s]})
    with pytest.raises(UsageError, match="same number"):
        compare_seeded_arms(y, {"a": [s], "b": [s]})
    with pytest.raises(DataError, match="arm 'b', seed 1: 9 scores for 10"):
        compare_seeded_arms(y, {"a": [s, s], "b": [s, s[:9]]})
    with pytest.raises(UsageError, match="reference arm 'c'"):
        compare_seeded_arms(y, {"a": [s, s], "b": [s, s]}, reference="c")
