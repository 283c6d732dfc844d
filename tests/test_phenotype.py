"""The phenotype judge: trained without the few-shot images, Wilson CIs, McNemar and Fisher against references."""

import numpy as np
import pytest
import torch
from scipy.stats import chi2, fisher_exact, wilcoxon
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar

from busgen_lib.data.manifest import read_manifest
from busgen_lib.evaluate.phenotype import PhenotypeJudge, compare_shares, fit_phenotype_judge, mcnemar_p
from busgen_lib.evaluate.probes import Probe
from busgen_lib.evaluate.stats import auc_ci, proportion_ci


class SignJudge(torch.nn.Module):
    """Calls an image the phenotype when its mean is positive."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def test_shares_and_paired_mcnemar_test_match_a_hand_count():
    judge = PhenotypeJudge(Probe(SignJudge(), ("other", "dcis")), "dcis", 2, None)  # 4 px images are resized
    base = torch.cat([torch.full((18, 1, 4, 4), -0.5), torch.full((2, 1, 4, 4), 0.5)])
    adapted = torch.cat([torch.full((7, 1, 4, 4), -0.5), torch.full((13, 1, 4, 4), 0.5)])
    table = compare_shares(judge, {"base": base, "adapted": adapted}).set_index("model")
    assert table.loc["base", "called_dcis"] == 2 and table.loc["adapted", "called_dcis"] == 13
    assert table.loc["adapted", ["share", "ci_lo", "ci_hi"]].tolist() == pytest.approx(proportion_ci(13, 20))
    # pairs: 7 called in neither, 11 only in the adapted twin, 2 in both, 0 only in the base twin.
    # Exact McNemar: 11 of 11 discordant pairs on one side, two-sided binomial p = 2 / 2^11.
    assert table.loc["adapted", "mcnemar_p_vs_base"] == pytest.approx(2 / 2 ** 11)
    assert "fisher_p_vs_base" not in table
    unpaired = compare_shares(judge, {"base": base, "adapted": adapted}, paired=False).set_index("model")
    assert unpaired.loc["adapted", "fisher_p_vs_base"] == pytest.approx(fisher_exact([[13, 7], [2, 18]])[1])


def test_mcnemar_matches_statsmodels_and_the_chi_square_formula_for_many_discordant_pairs():
    # hand table: 20 both called, 30 only by the arm, 10 only by the reference, 0 neither.
    called = np.r_[np.ones(50, bool), np.zeros(10, bool)]
    reference = np.r_[np.ones(20, bool), np.zeros(30, bool), np.ones(10, bool)]
    p = mcnemar_p(called, reference)
    assert p == pytest.approx(mcnemar([[20, 30], [10, 0]], exact=False).pvalue)
    assert p == pytest.approx(chi2.sf((abs(30 - 10) - 1) ** 2 / 40, 1))  # continuity-corrected statistic
    assert mcnemar_p(called[:24], reference[:24]) == pytest.approx(mcnemar([[20, 4], [0, 0]], exact=True).pvalue)


def test_paired_shift_still_orders_images_when_the_share_is_saturated():
    """Every image is called the phenotype (share 1 vs 1, McNemar p = 1), yet 15 of 20 adapted twins score higher."""
    judge = PhenotypeJudge(Probe(SignJudge(), ("other", "tnbc")), "tnbc", 4, None)
    rng = np.random.default_rng(0)
    base_means = rng.uniform(0.3, 0.6, 20)
    shifts = np.r_[rng.uniform(0.05, 0.2, 15), -rng.uniform(0.05, 0.2, 5)]
    base = torch.tensor(base_means, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    adapted = torch.tensor(base_means + shifts, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    row = compare_shares(judge, {"base": base, "adapted": adapted}).set_index("model").loc["adapted"]
    assert row["share"] == 1.0 and row["mcnemar_p_vs_base"] == 1.0
    assert row[["more_tnbc", "more_ci_lo", "more_ci_hi"]].tolist() == pytest.approx(proportion_ci(15, 20))
    diff = 2 * (adapted.mean(dim=(1, 2, 3)) - base.mean(dim=(1, 2, 3))).numpy()  # SignJudge log-odds: 2 x mean
    assert row["wilcoxon_p_vs_base"] == pytest.approx(wilcoxon(diff).pvalue, rel=1e-5)
    assert row["median_log_odds_shift"] == pytest.approx(np.median(diff), rel=1e-4)


def test_paired_comparison_needs_arms_of_equal_size():
    judge = PhenotypeJudge(Probe(SignJudge(), ("other", "tnbc")), "tnbc", 4, None)
    with pytest.raises(ValueError, match="equal size"):
        compare_shares(judge, {"base": torch.zeros(3, 1, 4, 4), "adapted": torch.zeros(4, 1, 4, 4)})
    assert "more_tnbc" not in compare_shares(judge, {"base": torch.zeros(3, 1, 4, 4),
                                                     "adapted": torch.zeros(4, 1, 4, 4)}, paired=False)


def test_judge_keeps_few_shot_images_out_and_is_cross_validated_by_patient(small_phantom):
    df = read_manifest(small_phantom)
    malignant = df[df["pathology"] == "malignant"]
    shots = malignant[malignant["subtype"] == "dcis"]["image"].tolist()[:3]
    judge = fit_phenotype_judge(df, "dcis", size=16, epochs=2, exclude_images=shots)
    report = judge.report.iloc[0]
    kept = malignant[~malignant["image"].isin(shots)]
    y = (kept["subtype"] == "dcis").to_numpy()
    assert report["n_images"] == len(kept) == len(judge.cv_scores) and report["n_phenotype"] == y.sum()
    assert report["cv_auc"] == pytest.approx(roc_auc_score(y, judge.cv_scores), abs=1e-12)
    assert report["cv_sensitivity"] == pytest.approx((judge.cv_scores[y] >= 0.5).mean())
    assert report["cv_false_positive_rate"] == pytest.approx((judge.cv_scores[~y] >= 0.5).mean())
    patients = kept["patient_id"].astype(str).to_numpy()
    assert report["folds"] == min(5, len(set(patients[y])), len(set(patients[~y])))
    assert (report["auc_lo"], report["auc_hi"]) == pytest.approx(auc_ci(y, judge.cv_scores, seed=0)[1:])


def test_a_phenotype_without_two_patients_is_a_clear_error(small_phantom):
    df = read_manifest(small_phantom)
    with pytest.raises(ValueError, match="with and without subtype 'angiosarcoma'"):
        fit_phenotype_judge(df, "angiosarcoma", size=16, epochs=1)
    one_patient = df[(df["subtype"] != "dcis") | (df["patient_id"] == df[df["subtype"] == "dcis"]["patient_id"].iloc[0])]
    with pytest.raises(ValueError, match="at least 2 patients"):
        fit_phenotype_judge(one_patient, "dcis", size=16, epochs=1)
