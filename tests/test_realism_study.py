"""Notebook 04's study on a tiny model and phantom: the CPSample arm is paired with the plain one only when it was
sampled with the same settings, and copied training images are found as copies."""

from __future__ import annotations

import json
import shutil

import pytest

from busgen_lib.data.manifest import read_manifest
from busgen_lib.experiments.realism import CPSAMPLE, PLAIN, generated_arms, realism_study

SAMPLING = dict(steps=2, guidance=1.0, sampler="dpmsolver++-singlestep", order=2)


@pytest.fixture(scope="module")
def plain_dir(smoke_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("arms") / "plain"
    generated_arms(smoke_model, 3, out, seed=4, **SAMPLING)
    return out


def _fake_cpsample(plain_dir, tmp_path, **changes):
    """A copy of the plain arm whose settings say CPSample (and `changes`): the pixels stay the same."""
    target = tmp_path / "cpsample"
    shutil.copytree(plain_dir, target)
    settings = json.loads((target / "settings.json").read_text())
    settings |= {"cond_fn": {"alpha": 0.01, "scale": 100.0}, **changes}
    (target / "settings.json").write_text(json.dumps(settings))
    return target


def test_the_cpsample_arm_is_paired_and_its_unchanged_images_counted(smoke_model, plain_dir, tmp_path, one_thread):
    arms, note = generated_arms(smoke_model, 3, plain_dir, _fake_cpsample(plain_dir, tmp_path), seed=4, **SAMPLING)
    assert list(arms) == [PLAIN, CPSAMPLE] and len(arms[CPSAMPLE]) == 3
    assert list(arms[CPSAMPLE]["seed"]) == list(arms[PLAIN]["seed"])
    assert "3 of them identical" in note


def test_a_cpsample_folder_with_other_settings_or_without_cpsample_is_left_out(smoke_model, plain_dir, tmp_path,
                                                                               one_thread):
    arms, note = generated_arms(smoke_model, 3, plain_dir, _fake_cpsample(plain_dir, tmp_path, guidance=1.8),
                                seed=4, **SAMPLING)
    assert list(arms) == [PLAIN] and "other guidance" in note
    arms, note = generated_arms(smoke_model, 3, plain_dir, plain_dir, seed=4, **SAMPLING)
    assert list(arms) == [PLAIN] and "no CPSample" in note
    arms, note = generated_arms(smoke_model, 3, plain_dir, tmp_path / "absent", seed=4, **SAMPLING)
    assert list(arms) == [PLAIN] and "not found" in note


def test_realism_study_finds_copied_training_images(small_phantom, tmp_path, one_thread):
    df = read_manifest(small_phantom)
    copies = df[df["split"] == "train"].drop_duplicates("patient_id").iloc[:8]  # 8 patients: 2 folds fit
    study = realism_study(small_phantom, {"copies": copies}, tmp_path, size=32, probe_size=16, encoder_epochs=1,
                          classifier_epochs=1, folds=2, seed=0)
    table = study.table().set_index("arm")
    assert list(table.index) == ["copies", "real hold-out"]
    assert table.loc["copies", "copies"] == 8 and table.loc["copies", "max_cosine"] == pytest.approx(1.0)
    assert table.loc["copies", "median_msssim"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc["real hold-out", "copies"] == 0
    assert table["two_sample_auc"].between(0, 1).all()
    assert len(study.images["real hold-out"]) == (df["split"] == "test").sum()
