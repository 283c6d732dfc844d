"""BUS-DM (downstream/classifier.py), the task parser (tasks.py) and §4.4's CV/repeat protocol (training.py)."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
import torch
from downstream_fixtures import bright_dark_manifest
from sklearn.metrics import roc_auc_score

from busgen_lib.data.manifest import read_manifest
from busgen_lib.downstream.classifier import DiagnosticModel, create_backbone, downstream_settings, train_classifier
from busgen_lib.downstream.tasks import Task
from busgen_lib.downstream.training import cross_validate
from busgen_lib.errors import DataError, UsageError
from busgen_lib.profiles import get_downstream

EPOCHS = 12  # 24 steps of 16: the smoke ViT separates bright from dark; 1 epoch does not


@pytest.fixture(scope="module")
def bright_dark(tmp_path_factory) -> pd.DataFrame:
    return read_manifest(bright_dark_manifest(tmp_path_factory.mktemp("bright_dark")))


@pytest.fixture(scope="module")
def trained(bright_dark) -> DiagnosticModel:
    torch.set_num_threads(1)
    return train_classifier(bright_dark[bright_dark.split == "train"], Task.parse("benign-malignant"), "smoke",
                            seed=0, epochs=EPOCHS)


# --------------------------------------------------------------------------- tasks

def test_task_strings_parse_to_column_and_classes():
    assert Task.parse("benign-malignant") == Task("pathology", "benign", "malignant")
    assert Task.parse("subtype:fibroadenoma,dcis") == Task("subtype", "fibroadenoma", "dcis")
    assert Task.parse("detection").is_detection
    for text in ("benign-malignant", "tnbc:0,1", "detection"):
        assert str(Task.parse(text)) == text


@pytest.mark.parametrize("text", ["benign-vs-malignant", "subtype:dcis", "subtype:a,a", ":a,b", "subtype:a,b,c"])
def test_unknown_task_is_a_usage_error(text):
    with pytest.raises(UsageError, match="unknown task"):
        Task.parse(text)


def test_select_keeps_negative_and_positive_rows_only():
    df = pd.DataFrame({"pathology": ["benign", "normal", "malignant", "benign"],
                       "tnbc": ["0.0", "", "1.0", "0"]})
    rows, y = Task.parse("benign-malignant").select(df)
    assert rows.index.tolist() == [0, 2, 3] and y.tolist() == [0, 1, 0]
    rows, y = Task.parse("tnbc:0,1").select(df)  # a CSV column with gaps reads back as floats
    assert rows.index.tolist() == [0, 2, 3] and y.tolist() == [0, 1, 0]


def test_select_names_manifest_and_column_when_labels_are_missing():
    df = pd.DataFrame({"pathology": ["benign", "benign"]})
    with pytest.raises(DataError, match=r"test\.csv: task tnbc:0,1 needs a column 'tnbc'"):
        Task.parse("tnbc:0,1").select(df, source="test.csv")
    with pytest.raises(DataError, match=r"test\.csv: .*needs positive rows \(pathology = 'malignant'\)"):
        Task.parse("benign-malignant").select(df, source="test.csv")


# --------------------------------------------------------------------------- the model

def test_learns_bright_vs_dark(trained, bright_dark):
    rows, y = Task.parse("benign-malignant").select(bright_dark[bright_dark.split == "test"])
    assert roc_auc_score(y, trained.predict_proba(rows)) >= 0.95


def test_untrained_recipe_does_not_separate(bright_dark):
    """The AUC bar above can fail: zero epochs leave the network at chance on the same data."""
    train = bright_dark[bright_dark.split == "train"]
    model = train_classifier(train, Task.parse("benign-malignant"), "smoke", seed=0, epochs=0)
    rows, y = Task.parse("benign-malignant").select(bright_dark[bright_dark.split == "test"])
    assert roc_auc_score(y, model.predict_proba(rows)) < 0.95


def test_features_are_the_pooled_features_before_the_head(trained, bright_dark):
    rows = bright_dark.iloc[:5]
    features = trained.features(rows)
    assert features.shape == (5, get_downstream("smoke").backbone_kwargs["embed_dim"])
    head = trained.network.get_classifier()
    with torch.no_grad():
        logits = head(torch.from_numpy(features))
    np.testing.assert_allclose(logits.softmax(1)[:, 1].numpy(), trained.predict_proba(rows), rtol=1e-5, atol=1e-6)


def test_training_is_deterministic_given_a_seed(bright_dark):
    train = bright_dark[bright_dark.split == "train"]
    task = Task.parse("benign-malignant")
    a, b, c = (train_classifier(train, task, "smoke", seed=s, epochs=1) for s in (3, 3, 4))
    rows = bright_dark.iloc[:8]
    np.testing.assert_array_equal(a.predict_proba(rows), b.predict_proba(rows))
    assert not np.allclose(a.predict_proba(rows), c.predict_proba(rows))


def test_save_load_round_trip_gives_identical_predictions(trained, bright_dark, tmp_path):
    trained.save(tmp_path / "model")
    loaded = DiagnosticModel.load(tmp_path / "model", task="benign-malignant")
    np.testing.assert_array_equal(loaded.predict_proba(bright_dark), trained.predict_proba(bright_dark))
    assert loaded.record["backbone"] == "vit_tiny_patch16_224" and loaded.record["input_size"] == 32
    assert loaded.record["n_train"] == 32 and loaded.record["n_positive"] == 16


def test_loading_a_model_for_another_task_is_refused(trained, tmp_path):
    trained.save(tmp_path / "model")
    with pytest.raises(UsageError, match="trained for task 'benign-malignant', not 'subtype:fibroadenoma,dcis'"):
        DiagnosticModel.load(tmp_path / "model", task=Task.parse("subtype:fibroadenoma,dcis"))
    with pytest.raises(UsageError, match="not a classifier folder"):
        DiagnosticModel.load(tmp_path)


def test_predict_accepts_an_image_tensor(trained, bright_dark):
    from busgen_lib.data.dataset import load_images

    rows = bright_dark.iloc[:4]
    np.testing.assert_allclose(trained.predict_proba(load_images(rows, 64)), trained.predict_proba(rows), atol=0.05)


# --------------------------------------------------------------------------- §4.4 protocol

def test_cross_validation_groups_by_patient_and_picks_the_best_mean(bright_dark, monkeypatch):
    """A fake trainer records each fold: no patient on both sides; the winner has the highest mean AUC."""
    from dataclasses import replace

    from busgen_lib import profiles

    monkeypatch.setitem(profiles.DOWNSTREAM, "smoke", replace(profiles.DOWNSTREAM["smoke"], cv_folds=3,
                                                               lr_grid=(0.1, 0.2), epochs_grid=(1, 2)))
    df = bright_dark.copy()
    df["patient_id"] = [f"P{i // 2}" for i in range(len(df))]  # two images per patient
    seen = []

    class Fake:
        def __init__(self, train, lr, epochs):
            self.train_patients, self.lr, self.epochs = set(train["patient_id"]), lr, epochs

        def predict_proba(self, rows):
            seen.append(self.train_patients & set(rows["patient_id"]))
            y = (rows["pathology"] == "malignant").to_numpy()
            good = self.lr == 0.2 and self.epochs == 1  # only this setting scores the truth
            return y.astype(float) if good else np.linspace(0, 1, len(y))

    def trainer(train, task, profile, seed, lr, epochs):
        return Fake(train, lr, epochs)

    result = cross_validate(trainer, df, Task.parse("benign-malignant"), "smoke", workers=1)  # `seen` is ours
    assert len(result.table) == 2 * 2 * 3 and len(seen) == 12 and all(not s for s in seen)
    assert result.best == {"lr": 0.2, "epochs": 1}
    assert result.summary.iloc[0]["mean_auc"] == 1.0


def test_cross_validation_in_worker_processes_gives_the_table_of_one_process(bright_dark, monkeypatch):
    from dataclasses import replace

    from busgen_lib import profiles
    from busgen_lib.downstream.recipes import TRAINERS

    monkeypatch.setitem(profiles.DOWNSTREAM, "smoke", replace(profiles.DOWNSTREAM["smoke"], cv_folds=2,
                                                               lr_grid=(1e-4, 1e-3), epochs_grid=(2,)))
    train, task = bright_dark[bright_dark.split == "train"], Task.parse("benign-malignant")
    torch.set_num_threads(2)  # the parent's thread pool in use before the fork, as in a notebook
    alone = cross_validate(TRAINERS["bus-dm"], train, task, "smoke", workers=1)
    torch.set_num_threads(1)
    forked = cross_validate(TRAINERS["bus-dm"], train, task, "smoke", workers=2)
    pd.testing.assert_frame_equal(forked.table, alone.table)
    assert forked.best == alone.best and len(alone.table) == 4


def test_a_train_fn_recipe_names_the_model_its_settings_and_its_tables():
    from busgen_lib.downstream.recipes import train_fn
    from busgen_lib.evaluate.training import recipe_of

    task = Task.parse("benign-malignant")
    smoke, demo = train_fn("bus-dm", task, "smoke").recipe, train_fn("bus-dm", task, "demo").recipe
    assert smoke["settings"]["backbone_kwargs"] == get_downstream("smoke").backbone_kwargs
    assert smoke["settings"] != demo["settings"] and train_fn("baseline-clip", task, "smoke").recipe != smoke
    table = pd.DataFrame({"image": ["a.png"], "pathology": ["benign"]})
    with_table = recipe_of(train_fn("baseline-clip", task, "smoke", pretrain_df=table))
    other = recipe_of(train_fn("baseline-clip", task, "smoke", pretrain_df=table.assign(pathology="malignant")))
    assert len(with_table["options"]["pretrain_df"]) == 64 and with_table != other   # tables by SHA-256


def test_select_dir_cross_validates_each_training_set_once_and_trains_every_seed_with_the_choice(
        bright_dark, tmp_path, monkeypatch):
    from dataclasses import replace

    from busgen_lib import parallel, profiles
    from busgen_lib.downstream import recipes

    # lr 1e-7 cannot move the weights in 12 epochs, 1e-3 separates bright from dark: CV must pick 1e-3.
    grid = replace(get_downstream("smoke"), lr_grid=(1e-7, 1e-3), epochs_grid=(EPOCHS,), cv_folds=2)
    monkeypatch.setitem(profiles.DOWNSTREAM, "smoke", grid)
    calls, real_trainer = [], recipes.TRAINERS["bus-dm"]

    def spy(rows, task, profile, seed=0, lr=None, epochs=None):
        calls.append((len(rows), lr, epochs))
        return real_trainer(rows, task, profile, seed=seed, lr=lr, epochs=epochs)

    monkeypatch.setitem(recipes.TRAINERS, "bus-dm", spy)
    monkeypatch.setattr(parallel, "default_workers", lambda: 1)  # the spy counts calls in this process
    train, task = bright_dark[bright_dark.split == "train"], Task.parse("benign-malignant")
    fit = recipes.train_fn("bus-dm", task, "smoke", select_dir=tmp_path)
    fit(train, 3)
    assert len(calls) == 2 * 2 + 1 and calls[-1] == (len(train), 1e-3, EPOCHS)
    expected = cross_validate(real_trainer, train, task, "smoke")   # the same folds and fits, run directly
    table = recipes.cv_summary(tmp_path).set_index("lr")
    assert table["mean_auc"].to_dict() == pytest.approx(expected.summary.set_index("lr")["mean_auc"].to_dict())
    assert table.loc[1e-3, "chosen"] and not table.loc[1e-7, "chosen"] and table["n_train"].eq(len(train)).all()
    fit(train, 4)
    assert len(calls) == 2 * 2 + 2 and calls[-1] == (len(train), 1e-3, EPOCHS)   # the choice is kept, not redone
    fit(train.iloc[2:], 3)   # another training set: its own choice, kept beside the first
    assert recipes.cv_summary(tmp_path)["training_set"].nunique() == 2
    mine = recipes.cv_summary(tmp_path, {"bright/dark": train})   # a study's own arms, by name
    assert set(mine["training_set"]) == {"bright/dark"} and mine["n_train"].eq(len(train)).all()
    assert mine["mean_auc"].tolist() == table["mean_auc"].tolist()


def test_a_study_backbone_replaces_the_profiles_and_round_trips(bright_dark, tmp_path):
    torch.set_num_threads(1)
    task = Task.parse("benign-malignant")
    train, test = bright_dark[bright_dark.split == "train"], bright_dark[bright_dark.split == "test"]
    model = train_classifier(train, task, "smoke", seed=0, epochs=EPOCHS, backbone="test_resnet")
    assert (model.record["backbone"], model.record["backbone_kwargs"]) == ("test_resnet", {})
    assert get_downstream("smoke").backbone != "test_resnet"  # the profile itself is unchanged
    rows, y = task.select(test)
    score = model.predict_proba(rows)
    assert roc_auc_score(y, score) >= 0.95
    loaded = DiagnosticModel.load(model.save(tmp_path / "cnn"), task=task)
    np.testing.assert_array_equal(loaded.predict_proba(rows), score)


def test_a_study_input_size_replaces_the_profiles_and_round_trips(bright_dark, tmp_path):
    torch.set_num_threads(1)
    task = Task.parse("benign-malignant")
    train, test = bright_dark[bright_dark.split == "train"], bright_dark[bright_dark.split == "test"]
    model = train_classifier(train, task, "smoke", seed=0, epochs=EPOCHS, backbone="test_resnet", input_size=16)
    assert model.record["input_size"] == 16 != get_downstream("smoke").input_size
    rows, y = task.select(test)
    score = model.predict_proba(rows)
    assert roc_auc_score(y, score) >= 0.95
    loaded = DiagnosticModel.load(model.save(tmp_path / "small"), task=task)
    assert loaded.input_size == 16
    np.testing.assert_array_equal(loaded.predict_proba(rows), score)


def test_a_vits_image_size_follows_a_study_input_size():
    vit = downstream_settings("demo", input_size=32)
    assert (vit.input_size, vit.backbone_kwargs["img_size"]) == (32, 32)
    assert vit.backbone_kwargs["patch_size"] == get_downstream("demo").backbone_kwargs["patch_size"]
    assert create_backbone(vit.backbone, vit.backbone_kwargs)(torch.zeros(1, 1, 32, 32)).shape == (1, 2)
    assert "img_size" not in downstream_settings("demo", backbone="test_resnet", input_size=32).backbone_kwargs


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_the_phantom_recipe_is_options_both_downstream_trainers_take(profile):
    from busgen_lib.downstream.clip_baseline import train_baseline_clip
    from busgen_lib.profiles import get_study

    recipe = get_study(profile).phantom_recipe
    for trainer in (train_classifier, train_baseline_clip):
        inspect.signature(trainer).bind_partial(**recipe)   # raises TypeError on an option the trainer lacks
