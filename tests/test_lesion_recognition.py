"""Lesion recognition (seeds/003): eq. 3's pairs per variant, eq. 2's loss, MCR and Tables 1-2's metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_metric_learning.utils.loss_and_miner_utils import get_all_pairs_indices
from scipy import stats as sps
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.downstream import lesion_recognition as lr
from busgen_lib.downstream.training import as_inputs
from busgen_lib.errors import DataError, UsageError
from busgen_lib.profiles import get_lesion_recognition
from manifest_fixtures import write_png

# A hand-made batch: lesions A, A, B, B, C, D (A, B benign; C, D malignant).
IDS = torch.tensor([0, 0, 1, 1, 2, 3])
CLASSES = torch.tensor([0, 0, 0, 0, 1, 1])


def pairs(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in zip(*torch.where(mask))}


# --------------------------------------------------------------------------- masks

def test_lr_positives_are_the_other_views_of_the_same_lesion_only():
    pos, neg = lr.pair_masks(IDS, CLASSES, "all")
    assert pairs(pos) == {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert pairs(neg) == {(i, j) for i in range(6) for j in range(6) if int(IDS[i]) != int(IDS[j])}


def test_lr_masks_equal_pytorch_metric_learnings_pairs_of_the_lesion_label():
    a1, p, a2, n = get_all_pairs_indices(IDS)
    pos, neg = lr.pair_masks(IDS, CLASSES, "all")
    assert pairs(pos) == set(zip(a1.tolist(), p.tolist())) and pairs(neg) == set(zip(a2.tolist(), n.tolist()))


def test_lr_minus_has_no_negatives():
    pos, neg = lr.pair_masks(IDS, CLASSES, "none")
    assert pairs(neg) == set() and pairs(pos) == {(0, 1), (1, 0), (2, 3), (3, 2)}


def test_lr_minus_sc_keeps_only_negatives_of_the_other_class():
    _, neg = lr.pair_masks(IDS, CLASSES, "other-class")
    benign, malignant = {0, 1, 2, 3}, {4, 5}
    assert pairs(neg) == {(i, j) for i in benign for j in malignant} | {(j, i) for i in benign for j in malignant}


def test_lr_minus_dc_keeps_only_negatives_of_the_same_class_from_other_lesions():
    _, neg = lr.pair_masks(IDS, CLASSES, "same-class")
    assert pairs(neg) == {(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (3, 0), (2, 1), (3, 1), (4, 5), (5, 4)}


def test_ir_pairs_an_image_with_its_second_augmentation_only():
    ids = torch.arange(3).repeat(2)  # as fit() labels two augmentations of three images (by image index)
    pos, neg = lr.pair_masks(ids, torch.zeros(6, dtype=torch.long), "all")
    assert pairs(pos) == {(0, 3), (3, 0), (1, 4), (4, 1), (2, 5), (5, 2)}
    assert (0, 1) in pairs(neg)  # another view of the same lesion repels in IR


def test_unknown_negatives_and_variants_are_refused():
    with pytest.raises(UsageError, match="negatives"):
        lr.pair_masks(IDS, CLASSES, "hard")
    with pytest.raises(UsageError, match="unknown lesion-recognition variant 'simclr'.*baseline"):
        lr.get_variant("simclr")


# --------------------------------------------------------------------------- eq. 2

def eq2_direct(z: np.ndarray, pos: np.ndarray, neg: np.ndarray, tau: float) -> float:
    """Eq. 2 written out with loops: per anchor, mean over positives of −log(e^{s_ij/τ} / Σ_{k∈P∪N} e^{s_ik/τ}),
    then 1/N_b over all anchors (one without positives adds 0)."""
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    losses = []
    for i in range(len(z)):
        positives = [j for j in range(len(z)) if pos[i, j]]
        if not positives:
            losses.append(0.0)
            continue
        denominator = sum(math.exp(unit[i] @ unit[k] / tau) for k in range(len(z)) if pos[i, k] or neg[i, k])
        losses.append(np.mean([-math.log(math.exp(unit[i] @ unit[j] / tau) / denominator) for j in positives]))
    return float(np.mean(losses))


@pytest.mark.parametrize("negatives", ["all", "none", "other-class", "same-class"])
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_contrastive_loss_equals_eq2_written_out(negatives, tau):
    # lesions of 3, 2, 3 and 1 views: lesion 3 has no positive, lesion 1's single positive gives LR(−) a 0 term
    ids, classes = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3]), torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    z = torch.randn(9, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pos, neg = lr.pair_masks(ids, classes, negatives)
    expected = eq2_direct(z.numpy(), pos.numpy(), neg.numpy(), tau)
    got = float(lr.contrastive_loss(z, ids, classes, negatives, tau))
    assert got == pytest.approx(expected, rel=1e-6)
    assert expected > 0  # three views per lesion: even LR(−)'s softmax over positives alone is not trivially 0


def test_contrastive_loss_falls_when_views_of_a_lesion_align():
    ids, classes = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    crossed = aligned[[0, 2, 1, 3]]
    assert lr.contrastive_loss(aligned, ids, classes, temperature=0.1) < lr.contrastive_loss(crossed, ids, classes,
                                                                                              temperature=0.1)


# --------------------------------------------------------------------------- metrics

def test_mcr_on_a_hand_case():
    # lesion a: 1 of 4 wrong; b: none wrong (left out); c: 2 of 2 wrong -> (1/4 + 1) / 2
    lesions = ["a"] * 4 + ["b"] * 3 + ["c"] * 2
    y = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1])
    pred = np.array([1, 0, 1, 1, 0, 0, 0, 0, 0])
    assert lr.inner_lesion_mcr(y, pred, lesions) == pytest.approx(0.625)
    assert math.isnan(lr.inner_lesion_mcr(y, y, lesions))


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    proba = np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1)
    lesions = np.repeat(np.arange(20), 3)
    pred = (proba >= 0.5).astype(int)
    got = lr.lesion_metrics(y, proba, lesions)
    tn = np.sum((pred == 0) & (y == 0))
    assert got["auc"] == pytest.approx(roc_auc_score(y, proba))
    assert got["acc"] == pytest.approx(accuracy_score(y, pred))
    assert got["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert got["precision"] == pytest.approx(precision_score(y, pred))
    assert got["specificity"] == pytest.approx(tn / np.sum(y == 0))
    assert got["f1"] == pytest.approx(f1_score(y, pred))


def test_paired_test_across_folds_matches_scipy():
    lr_auc, base_auc = [0.90, 0.85, 0.93, 0.88, 0.91], [0.86, 0.84, 0.90, 0.89, 0.85]
    table = pd.DataFrame([{"arm": "real", "variant": v, "fold": f, **{m: a for m in lr.METRICS}}
                          for v, aucs in (("lr", lr_auc), ("baseline", base_auc)) for f, a in enumerate(aucs)])
    out = lr.paired_test(table)
    assert out.loc["auc", "t_p"] == pytest.approx(sps.ttest_rel(lr_auc, base_auc).pvalue)
    assert out.loc["auc", "wilcoxon_p"] == pytest.approx(sps.wilcoxon(lr_auc, base_auc).pvalue)
    assert out.loc["auc", "diff_mean"] == pytest.approx(np.mean(np.subtract(lr_auc, base_auc)))


def test_summary_table_is_mean_and_sd_in_percent():
    table = pd.DataFrame([{"variant": "lr", "fold": f, **{m: v for m in lr.METRICS}}
                          for f, v in enumerate([0.90, 0.80, 0.85])])
    assert lr.summary_table(table).loc["LR", "auc"] == "85.0 ± 5.0"


# --------------------------------------------------------------------------- data and training

def multiview_manifest(root: Path, lesions: int = 12, views: int = 3) -> Path:
    """Bright malignant / dark benign lesions, `views` noisy views each, one patient per lesion."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(lesions):
        malignant = k % 2 == 1
        for v in range(views):
            name = f"images/L{k:02d}_v{v}.png"
            write_png(root / name, rng.normal(180 if malignant else 70, 30, (32, 32)).clip(0, 255))
            rows.append({"image": name, "patient_id": f"P{k:02d}", "exam_id": f"E{k:02d}", "lesion_id": f"L{k:02d}",
                         "view": str(v), "split": "train", "pathology": "malignant" if malignant else "benign",
                         "subtype": "", "birads": "", "device": "dev1", "boxes": "[[0.25, 0.25, 0.75, 0.75]]"})
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")


def test_lesion_rows_refuse_a_manifest_without_lesion_ids(tmp_path):
    df = read_manifest(multiview_manifest(tmp_path)).drop(columns="lesion_id")
    df.attrs["source"] = "my.csv"
    with pytest.raises(DataError, match="my.csv: lesion recognition needs a lesion_id column"):
        lr.lesion_rows(df)


def test_lesion_rows_refuse_images_without_a_lesion_id(tmp_path):
    df = read_manifest(multiview_manifest(tmp_path))
    df["lesion_id"] = ""  # how the real sets' importers leave it: one image per case, no lesion grouping
    with pytest.raises(DataError, match="36 lesion image.s. have an empty lesion_id, e.g. image .*L00_v0.png"):
        lr.lesion_rows(df)


def test_lesion_rows_refuse_lesions_seen_in_a_single_view_only(tmp_path):
    df = read_manifest(multiview_manifest(tmp_path, lesions=6, views=1))
    with pytest.raises(DataError, match="every lesion has a single view"):
        lr.lesion_rows(df)


def test_lesion_rows_refuse_a_lesion_with_two_pathologies(tmp_path):
    df = read_manifest(multiview_manifest(tmp_path))
    df.loc[0, "pathology"] = "malignant"
    with pytest.raises(DataError, match="lesion_id 'L00' has both benign and malignant"):
        lr.lesion_rows(df)


def test_batches_hold_lesions_times_views():
    codes = np.repeat(np.arange(10), 3)
    batches = lr.lesion_batches(codes, lesions=4, views=2, steps=5, seed=0)
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    for b in batches:
        assert np.all(np.bincount(codes[b.numpy()], minlength=10) % 2 == 0)  # 2 images per lesion present
        assert len(np.unique(codes[b.numpy()])) == 4
    again = lr.lesion_batches(codes, lesions=4, views=2, steps=5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


@pytest.mark.parametrize("variant", list(lr.VARIANTS))
def test_every_variant_trains_and_learns_an_easy_task(tmp_path, variant):
    rows, y = lr.lesion_rows(read_manifest(multiview_manifest(tmp_path)))
    settings = get_lesion_recognition("smoke", steps=30, lesions_per_batch=4, views_per_lesion=3, lr=3e-3)
    images = as_inputs(rows, settings.input_size)
    net = lr.fit(variant, images, y, pd.factorize(rows["lesion_id"])[0], settings, seed=0)
    assert roc_auc_score(y, lr.predict_proba(net, images)) > 0.9


def test_cross_validation_splits_by_patient_and_keeps_extra_lesions_of_test_lesions_out(tmp_path):
    df = read_manifest(multiview_manifest(tmp_path))
    rows, y = lr.lesion_rows(df)
    folds = lr.patient_folds(rows, y, 2, 0)
    for train, test in folds:
        assert not set(rows["patient_id"].iloc[train]) & set(rows["patient_id"].iloc[test])
    # "generated" lesions: copies of real lesions under new ids, made from them (source_lesion)
    extra = df.assign(lesion_id="G" + df["lesion_id"], patient_id="G" + df["patient_id"], source_lesion=df["lesion_id"])
    table = lr.cross_validate(df, ["baseline", "lr"], "smoke", extra=extra, arm="real + extra")
    assert set(table["variant"]) == {"baseline", "lr"} and sorted(set(table["fold"])) == [0, 1]
    assert set(table["arm"]) == {"real + extra"}
    assert list(table["n_train"]) == [2 * len(train) for train, _ in folds for _ in range(2)]


def test_generated_lesion_plan_repeats_one_real_lesions_conditions_per_generated_lesion(tmp_path):
    from busgen_lib.experiments.lesion_recognition import lesion_plan

    df = read_manifest(multiview_manifest(tmp_path))
    plan = lesion_plan(df, n_lesions=4, views=3, seed=0)
    assert len(plan) == 12 and list(plan["pathology"]) == ["benign"] * 6 + ["malignant"] * 6
    for k in range(4):
        block = plan.iloc[3 * k: 3 * k + 3]
        assert block["source_lesion"].nunique() == 1 and block[["device", "boxes"]].drop_duplicates().shape[0] == 1
        source = df[(df["lesion_id"] == block["source_lesion"].iloc[0]) & (df["view"] == "0")]
        assert source["pathology"].iloc[0] == block["pathology"].iloc[0]
    assert plan["source_lesion"].iloc[::3].nunique() == 4  # 6 lesions per class: no source drawn twice
