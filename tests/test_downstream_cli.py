"""`downstream train|evaluate` (downstream/cli.py): round trip, detection dispatch, refused inputs."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pandas as pd
import pytest
import torch
from downstream_fixtures import bright_dark_manifest
from sklearn.metrics import roc_auc_score

from busgen_lib.downstream.cli import add_parser, main
from busgen_lib.errors import DataError, UsageError


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return bright_dark_manifest(tmp_path_factory.mktemp("bright_dark"))


@pytest.fixture(scope="module")
def model_dir(manifest, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("model")
    assert main(["downstream", "train", "--task", "benign-malignant", "--manifest", str(manifest),
                 "--out", str(out), "--profile", "smoke"]) == 0
    return out


def test_add_parser_registers_downstream_on_a_top_level_parser():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["downstream", "train", "--task", "tnbc:0,1", "--manifest", "a.csv", "--manifest",
                              "b.csv", "--out", "m", "--model", "baseline-clip"])
    assert (args.task, args.manifest, args.model, args.profile, args.split) == \
        ("tnbc:0,1", ["a.csv", "b.csv"], "baseline-clip", "demo", "train")


def test_train_then_evaluate_writes_one_score_per_test_image(manifest, model_dir, tmp_path, capsys):
    record = json.loads((model_dir / "model.json").read_text())
    assert record["task"] == "benign-malignant" and record["n_train"] == 32  # the train split only
    assert record["manifests"][0]["path"] == str(manifest.resolve())
    scores_path = tmp_path / "scores.csv"
    assert main(["downstream", "evaluate", "--model", str(model_dir), "--manifest", str(manifest),
                 "--split", "test", "--out", str(scores_path)]) == 0
    scores = pd.read_csv(scores_path)
    test = pd.read_csv(manifest).query("split == 'test'")
    assert len(scores) == len(test) == 16
    assert scores["label"].tolist() == (test["pathology"] == "malignant").astype(int).tolist()
    auc = roc_auc_score(scores["label"], scores["score"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"AUC {auc:.3f} (95% CI " in line and "n=16 (8 positive)" in line


def test_unknown_task_is_refused(manifest, tmp_path):
    with pytest.raises(UsageError, match="unknown task 'benign/malignant'"):
        main(["downstream", "train", "--task", "benign/malignant", "--manifest", str(manifest),
              "--out", str(tmp_path / "m"), "--profile", "smoke"])


def test_missing_labels_column_is_refused(manifest, model_dir, tmp_path):
    with pytest.raises(DataError, match=r"manifest\.csv: task tnbc:0,1 needs a column 'tnbc'"):
        main(["downstream", "train", "--task", "tnbc:0,1", "--manifest", str(manifest),
              "--out", str(tmp_path / "m"), "--profile", "smoke"])
    malignant_only = pd.read_csv(manifest).query("pathology == 'malignant'")
    malignant_only.to_csv(manifest.parent / "malignant_only.csv", index=False)
    with pytest.raises(DataError, match=r"malignant_only\.csv: task benign-malignant needs negative rows"):
        main(["downstream", "evaluate", "--model", str(model_dir), "--manifest",
              str(manifest.parent / "malignant_only.csv"), "--out", str(tmp_path / "s.csv")])


def test_a_folder_that_is_no_model_is_refused(manifest, tmp_path):
    with pytest.raises(UsageError, match="not a classifier folder"):
        main(["downstream", "evaluate", "--model", str(tmp_path), "--manifest", str(manifest),
              "--out", str(tmp_path / "s.csv")])


def test_detection_dispatches_to_the_detector_module(manifest, tmp_path, monkeypatch, capsys):
    """The detector contract (train_detector, Detector.save/load/predict, evaluate_detection, small_area_threshold)."""
    calls = {}

    class Detector:
        def save(self, folder):
            (folder / "detector.bin").parent.mkdir(parents=True, exist_ok=True)
            (folder / "detector.bin").write_text("x")

        @classmethod
        def load(cls, folder):
            calls["load"] = folder
            return cls()

        def predict(self, df):
            return [{"boxes": [[0.1, 0.1, 0.5, 0.5]], "scores": [0.9]} for _ in range(len(df))]

    def train_detector(df, profile, seed=0, progress=True):
        calls["train"] = (len(df), profile)
        return Detector()

    def evaluate_detection(detector, df, small_threshold):
        calls["eval"] = small_threshold
        return {"ap50": 0.5, "ap50_small": 0.25}

    fake = types.SimpleNamespace(Detector=Detector, train_detector=train_detector,
                                 evaluate_detection=evaluate_detection,
                                 small_area_threshold=lambda df, quantile=0.3: 0.05)
    monkeypatch.setitem(sys.modules, "busgen_lib.downstream.detector", fake)
    import busgen_lib.downstream as package
    monkeypatch.setattr(package, "detector", fake, raising=False)
    out = tmp_path / "det"
    assert main(["downstream", "train", "--task", "detection", "--manifest", str(manifest), "--out", str(out),
                 "--profile", "smoke"]) == 0
    assert calls["train"] == (32, "smoke")
    assert main(["downstream", "evaluate", "--model", str(out), "--manifest", str(manifest), "--split", "test",
                 "--out", str(tmp_path / "boxes.csv")]) == 0
    assert calls["eval"] == 0.05 and calls["load"] == out
    boxes = pd.read_csv(tmp_path / "boxes.csv")
    assert len(boxes) == 16 and json.loads(boxes["boxes"][0]) == [[0.1, 0.1, 0.5, 0.5]]
    assert "ap50 0.500, ap50_small 0.250" in capsys.readouterr().out


def test_train_with_cv_records_the_chosen_setting(manifest, tmp_path):
    out = tmp_path / "cv_model"
    assert main(["downstream", "train", "--task", "benign-malignant", "--manifest", str(manifest), "--out", str(out),
                 "--profile", "smoke", "--cv"]) == 0
    table = pd.read_csv(out / "cv.csv")
    assert table["fold"].tolist() == [0, 1]  # smoke: 2 folds x a 1 x 1 grid
    record = json.loads((out / "model.json").read_text())
    assert (record["lr"], record["epochs"]) == (table["lr"][0], table["epochs"][0])
