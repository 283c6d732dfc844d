"""The phenotype judge: trained without the few-shot images, shares with Wilson CIs, Fisher's test against scipy."""

import pytest
import torch
from scipy.stats import fisher_exact

from busgen_lib.data.manifest import read_manifest
from busgen_lib.evaluate.phenotype import PhenotypeJudge, compare_shares, fit_phenotype_judge
from busgen_lib.evaluate.probes import Probe
from busgen_lib.evaluate.stats import proportion_ci


class SignJudge(torch.nn.Module):
    """Calls an image the phenotype when its mean is positive."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def test_shares_and_fisher_test_match_scipy():
    judge = PhenotypeJudge(Probe(SignJudge(), ("other", "dcis")), "dcis", 2, None)  # 4 px images are resized
    base = torch.cat([torch.full((18, 1, 4, 4), -0.5), torch.full((2, 1, 4, 4), 0.5)])
    adapted = torch.cat([torch.full((7, 1, 4, 4), -0.5), torch.full((13, 1, 4, 4), 0.5)])
    table = compare_shares(judge, {"base": base, "adapted": adapted}).set_index("model")
    assert table.loc["base", "called_dcis"] == 2 and table.loc["adapted", "called_dcis"] == 13
    assert table.loc["adapted", ["share", "ci_lo", "ci_hi"]].tolist() == pytest.approx(proportion_ci(13, 20))
    assert table.loc["adapted", "fisher_p_vs_base"] == pytest.approx(fisher_exact([[13, 7], [2, 18]])[1])


def test_judge_keeps_few_shot_images_out_and_reports_held_out_scores(tiny_phantom):
    df = read_manifest(tiny_phantom)
    malignant = df[df["pathology"] == "malignant"]
    phenotype = malignant["subtype"].value_counts().index[0]
    shots = malignant[malignant["subtype"] == phenotype]["image"].tolist()[:2]
    judge = fit_phenotype_judge(df, phenotype, size=16, epochs=1, exclude_images=shots)
    report = judge.report.iloc[0]
    kept = malignant[~malignant["image"].isin(shots)]
    assert report["n_train"] + report["n_test"] == len(kept)
    assert report["n_test"] == (kept["split"] == "test").sum()
    with pytest.raises(ValueError, match="with and without subtype 'angiosarcoma'"):
        fit_phenotype_judge(df, "angiosarcoma", size=16, epochs=1)
