"""The prognosis study's data choices and AUC table (notebook 08, Fig 5a–b)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from busgen_lib.errors import DataError
from busgen_lib.experiments.prognosis import BUS_DM, CLIP, PAPER_AUC, TASKS, auc_table, real_training_set, task_rows


def cohort(n_patients: int = 40, seed: int = 0) -> pd.DataFrame:
    """Two images per patient; subtypes, node status and splits drawn at random (no image files needed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        pathology = rng.choice(["benign", "malignant"], p=[0.3, 0.7])
        subtype = "fibroadenoma" if pathology == "benign" else rng.choice(["idc", "tnbc", "dcis"], p=[0.6, 0.3, 0.1])
        aln = "" if pathology == "benign" else float(rng.random() < 0.4)
        split = rng.choice(["train", "val", "test"], p=[0.6, 0.1, 0.3])
        rows += [{"image": f"p{p}_v{v}.png", "patient_id": f"P{p}", "split": split, "pathology": pathology,
                  "subtype": subtype, "aln_positive": aln} for v in range(2)]
    return pd.DataFrame(rows)


def test_task_rows_are_invasive_carcinomas_with_a_tnbc_label():
    df = cohort()
    rows = task_rows(df)
    assert set(rows["pathology"]) == {"malignant"} and "dcis" not in set(rows["subtype"])
    assert len(rows) == int(((df["pathology"] == "malignant") & (df["subtype"] != "dcis")).sum())
    assert (rows["tnbc"] == (rows["subtype"] == "tnbc").astype(int)).all()


def test_task_rows_refuse_a_manifest_without_node_status():
    df = cohort().drop(columns="aln_positive")
    df.attrs["source"] = "mine.csv"
    with pytest.raises(DataError, match="mine.csv.*'aln_positive'"):
        task_rows(df)


@pytest.mark.parametrize("name", ["tnbc", "aln"])
def test_the_real_training_set_comes_from_the_train_split_at_its_prevalence(name):
    rows = task_rows(cohort(n_patients=120, seed=1))
    train = rows[rows["split"] == "train"]
    _, y_all = TASKS[name].select(train)
    chosen = real_training_set(rows, TASKS[name], n=20, seed=0)
    _, y = TASKS[name].select(chosen)
    assert set(chosen["split"]) == {"train"}
    assert y.sum() >= 2 and (1 - y).sum() >= 2
    assert y.sum() == max(2, round(20 * y_all.mean()))
    # spread over patients: with more patients than images per class, no patient gives two images
    assert chosen["patient_id"].nunique() == len(chosen)


def test_auc_table_gives_sklearns_auc_a_bracketing_ci_and_the_paired_p_for_bus_dm_only():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    scores = {BUS_DM: y + rng.normal(0, 0.7, 60), CLIP: y + rng.normal(0, 1.5, 60)}
    table = auc_table(y, scores, paper=PAPER_AUC["tnbc"]).set_index("model")
    for name, s in scores.items():
        assert table.loc[name, "auc"] == pytest.approx(roc_auc_score(y, s))
        assert table.loc[name, "ci_lo"] < table.loc[name, "auc"] < table.loc[name, "ci_hi"]
    assert 0 < table.loc[BUS_DM, "delong_p_vs_Baseline-CLIP"] < 1
    assert np.isnan(table.loc[CLIP, "delong_p_vs_Baseline-CLIP"])
    assert table.loc[BUS_DM, "paper"] == "0.803 (0.740–0.880), P = 0.0046"
    assert table.loc[CLIP, "paper"] == "0.723 (0.648–0.795)"


def test_a_trained_model_is_read_back_only_for_the_same_rows_backbone_and_epochs(tmp_path, monkeypatch, one_thread):
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.downstream.tasks import Task
    from busgen_lib.experiments import prognosis
    from downstream_fixtures import bright_dark_manifest

    df = read_manifest(bright_dark_manifest(tmp_path / "data", n_train=12, n_test=4))
    train, task = df[df["split"] == "train"], Task.parse("benign-malignant")
    first = prognosis.trained_model(BUS_DM, train, task, "smoke", tmp_path / "model")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the saved model fits")

    monkeypatch.setattr(prognosis, "train_classifier", no_training)
    again = prognosis.trained_model(BUS_DM, train, task, "smoke", tmp_path / "model")
    x = torch.zeros(2, 1, 32, 32)
    assert torch.equal(first.network(x), again.network(x))
    with pytest.raises(AssertionError, match="retrained"):  # other rows: the saved model is not reused
        prognosis.trained_model(BUS_DM, train.iloc[:-2], task, "smoke", tmp_path / "model")
    with pytest.raises(AssertionError, match="retrained"):  # another backbone: not reused either
        prognosis.trained_model(BUS_DM, train, task, "smoke", tmp_path / "model", backbone="test_resnet")
    with pytest.raises(AssertionError, match="retrained"):  # other epochs than the profile's 2: not reused
        prognosis.trained_model(BUS_DM, train, task, "smoke", tmp_path / "model", epochs=3)
    prognosis.trained_model(BUS_DM, train, task, "smoke", tmp_path / "model", epochs=2)  # the profile's, named: read back


def test_cue_scores_are_the_masked_mean_and_area():
    from busgen_lib.experiments.prognosis import CUE_MEASURES, cue_scores

    images = np.zeros((2, 4, 4))
    images[0, :2, :2], images[1, :, :] = 0.5, -0.25
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2], masks[1, :, :1] = True, True  # 4 and 4 pixels of 16
    masks[1, 0, 1] = True                           # 5 pixels
    scores = cue_scores(images, masks)
    np.testing.assert_allclose(scores[CUE_MEASURES[0]], [-0.5, 0.25])
    np.testing.assert_allclose(scores[CUE_MEASURES[1]], [4 / 16, 5 / 16])
    with pytest.raises(DataError, match="1 images have an empty lesion mask"):
        cue_scores(images, np.zeros_like(masks) | masks * np.array([1, 0])[:, None, None].astype(bool))


def test_cue_reference_gives_sklearns_auc_of_the_measures_on_the_held_out_rows(tiny_phantom):
    from busgen_lib.data.dataset import load_images, load_masks
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.experiments.prognosis import CUE_MEASURES, TaskResult, cue_reference

    task = TASKS["tnbc"]
    test, y = task.select(task_rows(read_manifest(tiny_phantom)))
    assert 0 < y.sum() < len(y)
    result = TaskResult(task, test, y, {}, {}, {})
    table = cue_reference(result, 32).set_index("measure")
    images, masks = load_images(test, 32)[:, 0].numpy(), load_masks(test, 32).numpy()
    inside = [im[m].mean() for im, m in zip(images, masks)]
    assert table.loc[CUE_MEASURES[0], "auc"] == pytest.approx(roc_auc_score(y, -np.array(inside)))
    assert table.loc[CUE_MEASURES[1], "auc"] == pytest.approx(roc_auc_score(y, masks.reshape(len(y), -1).mean(1)))
    assert (table["ci_lo"] <= table["auc"]).all() and (table["auc"] <= table["ci_hi"]).all()
    assert (table["n"] == len(y)).all()
