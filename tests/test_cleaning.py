"""Cleaning: exactly the confident contradictions go, with reasons, rates and CIs; files written beside the manifest."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.evaluate.cleaning import KEPT_MANIFEST, REJECTED_LOG, clean, clean_dataset, fit_label_classifier
from busgen_lib.data.dataset import load_images
from busgen_lib.evaluate.probes import Probe
from busgen_lib.evaluate.stats import proportion_ci


class MeanJudge(nn.Module):
    """Logits (0, 4·mean): an image's mean m gives p(malignant) = sigmoid(4m), known in closed form."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), 4 * m], dim=1)


MEANS = np.array([-1.0, -0.5, -0.1, 0.1, 0.5, 1.0, 0.2, -0.2])
REQUESTED = ["benign", "benign", "benign", "benign", "malignant", "malignant", "malignant", "malignant"]


def _setup():
    images = torch.tensor(MEANS, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 4, 4).clone()
    df = pd.DataFrame({"image": [f"{i}.png" for i in range(len(MEANS))], "pathology": REQUESTED})
    return df, images, Probe(MeanJudge(), ("benign", "malignant"))


@pytest.mark.parametrize("confidence", [0.0, 0.55, 0.6, 0.9])
def test_rejects_exactly_the_confident_contradictions(confidence):
    df, images, judge = _setup()
    result = clean(df, judge, images, confidence=confidence)
    p_malignant = 1 / (1 + np.exp(-4 * MEANS))
    predicted = np.where(p_malignant > 0.5, "malignant", "benign")
    p_predicted = np.maximum(p_malignant, 1 - p_malignant)
    expected = (predicted != np.array(REQUESTED)) & (p_predicted >= confidence)
    assert sorted(result.rejected["image"]) == sorted(df["image"][expected])
    assert len(result.kept) + len(result.rejected) == len(df)
    np.testing.assert_allclose(result.rejected["p_predicted"], p_predicted[expected], rtol=1e-5)
    for reason, want in zip(result.rejected["reason"], predicted[expected]):
        assert f"classifier says '{want}'" in reason


def test_rates_per_class_with_wilson_ci():
    df, images, judge = _setup()
    result = clean(df, judge, images, confidence=0.0)
    rates = result.rates.set_index("pathology")
    # benign requests with m > 0 (0.1) and malignant requests with m < 0 (-0.2) are contradicted
    assert rates.loc["benign", "rejected"] == 1 and rates.loc["malignant", "rejected"] == 1
    p, lo, hi = proportion_ci(1, 4)
    assert rates.loc["benign", ["rate", "ci_lo", "ci_hi"]].tolist() == pytest.approx([p, lo, hi])
    assert rates.loc["all", "n"] == 8 and result.rejection_rate == pytest.approx(2 / 8)


def test_errors_name_the_problem():
    df, images, judge = _setup()
    with pytest.raises(ValueError, match=r"\['normal'\] are not among"):
        clean(df.assign(pathology=["normal"] * len(df)), judge, images)
    with pytest.raises(ValueError, match="8 generated rows but 3 images"):
        clean(df, judge, images[:3])
    with pytest.raises(ValueError, match="confidence"):
        clean(df, judge, images, confidence=1.5)


def test_clean_dataset_writes_a_valid_manifest_and_a_log(tmp_path):
    df, images, judge = _setup()
    for name, m in zip(df["image"], MEANS):
        Image.fromarray(np.full((4, 4), int((m + 1) * 127.5), np.uint8)).save(tmp_path / name)
    ids = [f"p{i}" for i in range(len(df))]
    rows = df.assign(patient_id=ids, exam_id=ids, lesion_id=ids, view=0, split="train", subtype="", birads="",
                     device="", boxes=json.dumps([[0.2, 0.2, 0.6, 0.6]]))
    manifest = write_manifest(rows, tmp_path / "manifest.csv")
    result = clean_dataset(manifest, judge, images, confidence=0.0)
    kept = read_manifest(tmp_path / KEPT_MANIFEST)
    assert list(kept["image"]) == list(result.kept["image"])
    log = pd.read_csv(tmp_path / REJECTED_LOG)
    assert len(log) == 2 and log["reason"].str.contains("requested pathology").all()
    assert all((tmp_path / p.split("/")[-1]).exists() for p in log["image"])
    assert len(read_manifest(manifest)) == 8  # the original stays untouched


def test_label_classifier_is_trained_on_train_val_and_scored_on_test(tiny_phantom):
    df = read_manifest(tiny_phantom)
    df["split"] = df["split"].replace({"val": "test"})
    probe = fit_label_classifier(df, "pathology", size=32, epochs=2, seed=0)
    assert probe.classes == tuple(sorted(set(df["pathology"])))
    test = df[df["split"] == "test"]
    labels = test["pathology"].map({c: k for k, c in enumerate(probe.classes)}).to_numpy()
    assert probe.reference_accuracy == probe.accuracy(load_images(test, 32), labels)
    with pytest.raises(ValueError, match="at least two 'pathology' classes"):
        fit_label_classifier(df[df["pathology"] == "benign"], "pathology", size=32, epochs=1)


def test_protect_sample_with_cpsample_and_clean_from_the_command_line(smoke_model, tiny_phantom, tmp_path):
    from busgen_lib.cli import main

    classifier = tmp_path / "cpsample"
    assert main(["protect", "--model", str(smoke_model), "--manifest", str(tiny_phantom), "--out", str(classifier),
                 "--steps", "3"]) == 0
    runs = {}
    for name, extra in {"plain": [], "gated": ["--cpsample-alpha", "1e-12"],
                        "pushed": ["--cpsample-alpha", "0.5", "--cpsample-scale", "1000"]}.items():
        cps = ["--cpsample", str(classifier), *extra] if extra else []
        assert main(["sample", "--model", str(smoke_model), "--n", "3", "--out", str(tmp_path / name), *cps]) == 0
        runs[name] = load_images(read_manifest(tmp_path / name / "manifest.csv"), 32)
    assert torch.equal(runs["gated"], runs["plain"])  # a gate nothing passes changes nothing
    assert not torch.equal(runs["pushed"], runs["plain"])
    assert main(["clean", str(tmp_path / "plain" / "manifest.csv"), "--real", str(tiny_phantom), "--epochs", "1"]) == 0
    kept = read_manifest(tmp_path / "plain" / KEPT_MANIFEST)
    rejected = pd.read_csv(tmp_path / "plain" / REJECTED_LOG)
    assert len(kept) + len(rejected) == 3
