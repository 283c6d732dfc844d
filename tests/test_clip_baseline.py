"""Baseline-CLIP (downstream/clip_baseline.py): reports, the open_clip model, foreign weights, training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from downstream_fixtures import bright_dark_manifest
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from busgen_lib.data.manifest import read_manifest
from busgen_lib.downstream.classifier import DiagnosticModel
from busgen_lib.downstream.clip_baseline import (build_clip, compose_report, load_clip_weights, pretrained_clip,
                                                 train_baseline_clip)
from busgen_lib.downstream.tasks import Task
from busgen_lib.errors import DataError
from busgen_lib.profiles import get_downstream


@pytest.fixture(scope="module")
def bright_dark(tmp_path_factory) -> pd.DataFrame:
    return read_manifest(bright_dark_manifest(tmp_path_factory.mktemp("bright_dark")))


# --------------------------------------------------------------------------- reports

def test_report_of_a_phantom_row_lists_every_attribute_in_order():
    row = pd.Series({"image": "a.png", "pathology": "malignant", "birads": "4c", "shape": "irregular",
                     "margin": "spiculated", "orientation": "not parallel", "echo_pattern": "heterogeneous",
                     "posterior": "shadowing", "halo": "thick", "device": "Vendor-A L12-5"})
    assert compose_report(row) == ("Pathology: malignant. BI-RADS: 4c. Shape: irregular. Margin: spiculated. "
                                   "Orientation: not parallel. Echo pattern: heterogeneous. "
                                   "Posterior features: shadowing.")


def test_report_omits_missing_attributes_and_reads_breast_lesions_usg_names():
    row = pd.Series({"pathology": "benign", "birads": "3", "shape": "oval", "margin": float("nan"),
                     "echogenicity": "hypoechoic", "posterior_features": "not applicable"})
    assert compose_report(row) == "Pathology: benign. BI-RADS: 3. Shape: oval. Echo pattern: hypoechoic."
    assert compose_report(pd.Series({"pathology": "normal", "birads": "", "posterior": "none"})) == \
        "Pathology: normal."
    assert compose_report(pd.Series({"pathology": "benign", "posterior_features": "no"})) == "Pathology: benign."


# --------------------------------------------------------------------------- the model and its weights

def test_image_tower_is_the_bus_dm_backbone():
    settings = get_downstream("smoke")
    clip = build_clip(settings)
    images = torch.zeros(3, 1, settings.input_size, settings.input_size)
    assert clip.encode_image(images).shape == (3, settings.clip_embed_dim)
    assert clip.visual.trunk.default_cfg["architecture"] == "vit_tiny_patch16_224"
    assert clip.visual.trunk.num_features == settings.backbone_kwargs["embed_dim"]


@pytest.mark.parametrize("fmt", ["state_dict", "checkpoint", "safetensors"])
def test_foreign_clip_weights_load_exactly(tmp_path, fmt):
    """Weights the test writes itself (another seed's model, in open_clip's file formats) replace every tensor."""
    torch.manual_seed(123)
    foreign = {k: v.clone() for k, v in build_clip(get_downstream("smoke")).state_dict().items()}
    path = tmp_path / ("weights.safetensors" if fmt == "safetensors" else "weights.pt")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in foreign.items()}, str(path))
    elif fmt == "checkpoint":  # open_clip's training checkpoints: {"state_dict": {"module." + key: ...}}
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in foreign.items()}}, path)
    else:
        torch.save(foreign, path)
    torch.manual_seed(0)
    model = build_clip(get_downstream("smoke"))
    assert not torch.equal(model.visual.trunk.patch_embed.proj.weight, foreign["visual.trunk.patch_embed.proj.weight"])
    loaded = load_clip_weights(path, model).state_dict()
    assert loaded.keys() == foreign.keys()
    assert all(torch.equal(loaded[k], foreign[k]) for k in foreign)


def test_mismatched_clip_weights_name_the_file(tmp_path):
    state = build_clip(get_downstream("smoke")).state_dict()
    state["visual.head.proj.weight"] = torch.zeros(7, 7)
    path = tmp_path / "someone_elses.pt"
    torch.save(state, path)
    with pytest.raises(DataError, match=r"someone_elses\.pt: not open_clip weights of this CLIP.*size mismatch"):
        load_clip_weights(path, "smoke")
    with pytest.raises(DataError, match=r"missing\.pt: no such CLIP weights file"):
        load_clip_weights(tmp_path / "missing.pt", "smoke")


# --------------------------------------------------------------------------- training

def test_baseline_clip_learns_bright_vs_dark_and_round_trips(bright_dark, tmp_path):
    torch.set_num_threads(1)
    train, test = bright_dark[bright_dark.split == "train"], bright_dark[bright_dark.split == "test"]
    task = Task.parse("benign-malignant")
    model = train_baseline_clip(train, task, "smoke", seed=0, epochs=12)
    rows, y = task.select(test)
    score = model.predict_proba(rows)
    assert roc_auc_score(y, score) >= 0.95
    assert model.record["model"] == "baseline-clip" and model.record["clip"]["pretrain_rows"] == len(train)
    loaded = DiagnosticModel.load(model.save(tmp_path / "clip"), task=task)
    np.testing.assert_array_equal(loaded.predict_proba(rows), score)


def test_baseline_clip_starts_from_given_weights(bright_dark, tmp_path, monkeypatch):
    """With zero contrastive and zero fine-tuning epochs the trunk is exactly the user's weights."""
    from dataclasses import replace

    from busgen_lib import profiles

    monkeypatch.setitem(profiles.DOWNSTREAM, "smoke", replace(profiles.DOWNSTREAM["smoke"], clip_epochs=0))
    torch.manual_seed(99)
    foreign = build_clip(get_downstream("smoke")).state_dict()
    torch.save(foreign, tmp_path / "mine.pt")
    model = train_baseline_clip(bright_dark, Task.parse("benign-malignant"), "smoke", epochs=0,
                                clip_weights=tmp_path / "mine.pt")
    trunk = {k: v for k, v in model.network.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, foreign[f"visual.trunk.{k}"]) for k, v in trunk.items())
    assert model.record["clip"]["weights"]["path"].endswith("mine.pt")


def test_baseline_clip_takes_a_study_backbone_and_input_size_for_its_image_tower(bright_dark, tmp_path):
    torch.set_num_threads(1)
    train, test = bright_dark[bright_dark.split == "train"], bright_dark[bright_dark.split == "test"]
    task = Task.parse("benign-malignant")
    model = train_baseline_clip(train, task, "smoke", seed=0, epochs=12, backbone="test_resnet", input_size=16)
    assert (model.record["backbone"], model.record["input_size"]) == ("test_resnet", 16)
    rows, y = task.select(test)
    score = model.predict_proba(rows)
    assert roc_auc_score(y, score) >= 0.95
    loaded = DiagnosticModel.load(model.save(tmp_path / "clip_cnn"), task=task)
    np.testing.assert_array_equal(loaded.predict_proba(rows), score)


def test_shared_pretraining_fine_tunes_exactly_as_pretraining_inline(bright_dark, tmp_path, monkeypatch):
    """Seeds that share `pretrained_clip`'s weights (clip_epochs=0) get the very model that pretraining inside
    `train_baseline_clip` gives; the weights are computed once and read back."""
    from busgen_lib.downstream import clip_baseline

    torch.set_num_threads(1)
    train, test = bright_dark[bright_dark.split == "train"], bright_dark[bright_dark.split == "test"]
    task, rows = Task.parse("benign-malignant"), Task.parse("benign-malignant").select(test)[0]
    inline = train_baseline_clip(train, task, "smoke", seed=3, epochs=2)
    weights = pretrained_clip(train, "smoke", tmp_path, seed=3)
    shared = train_baseline_clip(train, task, "smoke", seed=3, epochs=2, clip_weights=weights, clip_epochs=0)
    np.testing.assert_array_equal(shared.predict_proba(rows), inline.predict_proba(rows))
    assert shared.record["clip"]["pretrain_rows"] == 0 and shared.record["clip"]["clip_epochs"] == 0

    monkeypatch.setattr(clip_baseline, "pretrain_clip", lambda *a, **k: pytest.fail("pretrained again"))
    assert pretrained_clip(train, "smoke", tmp_path, seed=3) == weights
    for other in ({"corpus": train.iloc[1:], "seed": 3}, {"corpus": train, "seed": 4}):  # never read back for these
        with pytest.raises(pytest.fail.Exception, match="pretrained again"):
            pretrained_clip(other["corpus"], "smoke", tmp_path, seed=other["seed"])
