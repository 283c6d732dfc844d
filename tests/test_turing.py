"""Visual Turing test statistics against hand-computed values (Wilson and Clopper-Pearson formulas, the
binomial distribution, Fleiss' kappa by its definition)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import beta, norm

from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.turing import EXPORT_COLUMNS, POOLED, read_turing_export, readers_kappa, turing_table

TRUTH = ["generated"] * 5 + ["real"] * 5
CALLS = {"A": ["generated"] * 4 + ["real"] + ["real"] * 4 + ["generated"],  # 8 of 10 right
         "B": ["real"] * 10}                                                  # calls everything real: 5 of 10


def _export(path, calls=CALLS, truth=TRUTH):
    rows = [{**{c: "" for c in EXPORT_COLUMNS}, "reader": reader, "image_id": f"img{i}", "position": str(i),
             "truth_source": truth[i], "answer": call, "confidence": "3"}
            for reader, answers in calls.items() for i, call in enumerate(answers)]
    pd.DataFrame(rows, columns=EXPORT_COLUMNS).to_csv(path, index=False)
    return path


def _wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    z, p = norm.ppf(0.5 + level / 2), k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def _two_sided_binomial(k: int, n: int) -> float:
    """Two-sided exact test at p = 0.5: the distribution is symmetric, so twice the smaller tail."""
    tail = sum(math.comb(n, j) for j in range(max(k, n - k), n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.fixture
def table(tmp_path):
    return turing_table(read_turing_export(_export(tmp_path / "answers.csv"))).set_index("reader")


def test_per_reader_rates_match_the_hand_count(table):
    a, b = table.loc["A"], table.loc["B"]
    assert (a["n"], a["correct"], a["accuracy"], a["sensitivity"], a["specificity"], a["generated_called_real"]) == \
        (10, 8, 0.8, 0.8, 0.8, 0.2)
    assert (b["correct"], b["sensitivity"], b["specificity"], b["generated_called_real"]) == (5, 0.0, 1.0, 1.0)
    pooled = table.loc[POOLED]
    assert (pooled["n"], pooled["correct"], pooled["n_generated"], pooled["n_real"]) == (20, 13, 10, 10)


def test_wilson_intervals_follow_the_formula(table):
    for reader, (k, n) in {"A": (8, 10), "B": (5, 10), POOLED: (13, 20)}.items():
        assert table.loc[reader, ["accuracy_lo", "accuracy_hi"]].tolist() == pytest.approx(_wilson(k, n), abs=1e-12)
    assert table.loc["A", ["sensitivity_lo", "sensitivity_hi"]].tolist() == pytest.approx(_wilson(4, 5), abs=1e-12)


def test_exact_intervals_are_clopper_pearson(tmp_path):
    exact = turing_table(read_turing_export(_export(tmp_path / "a.csv")), method="exact").set_index("reader")
    lo, hi = beta.ppf(0.025, 8, 3), beta.ppf(0.975, 9, 2)
    assert exact.loc["A", ["accuracy_lo", "accuracy_hi"]].tolist() == pytest.approx([lo, hi], abs=1e-10)
    assert exact.loc["B", "specificity_hi"] == 1.0 and exact.loc["B", "specificity_lo"] == pytest.approx(
        0.025 ** (1 / 5), abs=1e-10)  # 5 of 5: the lower bound solves p^5 = alpha/2


def test_binomial_test_against_chance(table):
    assert table.loc["A", "p_vs_chance"] == pytest.approx(112 / 1024, abs=1e-12)
    assert table.loc["B", "p_vs_chance"] == pytest.approx(1.0)
    assert table.loc[POOLED, "p_vs_chance"] == pytest.approx(_two_sided_binomial(13, 20), abs=1e-12)


def test_fleiss_kappa_by_its_definition(tmp_path):
    answers = read_turing_export(_export(tmp_path / "a.csv"))
    # agreement on the 5 images A called real: P = 0.5; ratings 5 G / 15 R: Pe = 0.25^2 + 0.75^2 = 0.625
    kappa, n = readers_kappa(answers)
    assert n == 10 and kappa == pytest.approx((0.5 - 0.625) / (1 - 0.625), abs=1e-12)
    perfect, _ = readers_kappa(read_turing_export(_export(tmp_path / "b.csv", {"A": CALLS["A"], "B": CALLS["A"]})))
    assert perfect == pytest.approx(1.0)


def test_kappa_uses_only_images_every_reader_answered(tmp_path):
    partial = {"A": CALLS["A"], "B": CALLS["B"][:6]}
    kappa, n = readers_kappa(read_turing_export(_export(tmp_path / "a.csv", partial)))
    # images 0-5: A = G G G G R R, B = R x6: agreement 2/6; 4 G, 8 R of 12 ratings
    p_e = (4 / 12) ** 2 + (8 / 12) ** 2
    assert n == 6 and kappa == pytest.approx((2 / 6 - p_e) / (1 - p_e), abs=1e-12)
    single, _ = readers_kappa(read_turing_export(_export(tmp_path / "b.csv", {"A": CALLS["A"]})))
    assert math.isnan(single)


def test_bad_exports_are_refused_with_row_and_column(tmp_path):
    path = _export(tmp_path / "a.csv")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[3, "answer"] = "fake"
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"row 4: answer: 'fake'"):
        read_turing_export(tmp_path / "bad.csv")
    pd.concat([df.iloc[:2], df.iloc[:1]]).assign(answer="real").to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="more than once"):
        read_turing_export(tmp_path / "dup.csv")
    df.drop(columns="truth_source").to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(DataError, match="missing column.*truth_source"):
        read_turing_export(tmp_path / "cols.csv")
    df.assign(answer="").to_csv(tmp_path / "birads.csv", index=False)
    with pytest.raises(DataError, match="another question"):
        read_turing_export(tmp_path / "birads.csv")
    with pytest.raises(UsageError, match="CI method"):
        turing_table(read_turing_export(path), method="jeffreys")
