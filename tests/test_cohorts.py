"""Adaptation cohorts: held-out phenotypes never reach pretraining; few-shot sets spread over patients."""

import json

import pytest

from busgen_lib.data import catalog
from busgen_lib.data.cohorts import PRETRAIN, few_shot, split_cohorts
from busgen_lib.data.manifest import read_manifest


def test_held_out_patients_never_reach_pretraining(tiny_phantom):
    df = read_manifest(tiny_phantom)
    held = [s for s in ("dcis", "tnbc", "idc") if (df["subtype"] == s).any()][:2]
    cohorts = split_cohorts(df, held)
    pre = cohorts[PRETRAIN]
    for name in held:
        part = cohorts[name]
        assert len(part) and (part["subtype"] == name).all()
        assert not set(part["patient_id"]) & set(pre["patient_id"])
        assert not (pre["subtype"] == name).any()
    assert set(df["patient_id"]) - set(pre["patient_id"]) == set(df.loc[df["subtype"].isin(held), "patient_id"])
    assert pre.attrs["root"] == df.attrs["root"]
    with pytest.raises(ValueError, match="no rows with subtype"):
        split_cohorts(df, ["angiosarcoma"])


def test_few_shot_is_deterministic_and_spread_over_patients(tiny_phantom):
    df = read_manifest(tiny_phantom)
    train = df[df["split"] == "train"]
    n = min(8, train["patient_id"].nunique())
    a, b = few_shot(df, n, seed=1), few_shot(df, n, seed=1)
    assert list(a["image"]) == list(b["image"]) and (a["split"] == "train").all()
    assert a["patient_id"].nunique() == n  # one per patient while patients last
    assert list(few_shot(df, n, seed=2)["image"]) != list(a["image"])
    with pytest.raises(ValueError, match="only"):
        few_shot(df, len(train) + 1)
    assert len(few_shot(df, len(train) + 1, allow_fewer=True)) == len(train)


def test_a_phantom_of_an_older_version_is_rendered_again(tmp_path, monkeypatch):
    from busgen_lib.data.phantom import writer

    manifest = catalog.phantom_dataset("smoke", tmp_path)
    first = manifest.stat().st_mtime_ns
    assert catalog.phantom_dataset("smoke", tmp_path).stat().st_mtime_ns == first   # current: reused
    monkeypatch.setattr(writer, "PHANTOM_VERSION", writer.PHANTOM_VERSION + 1)
    catalog.phantom_dataset("smoke", tmp_path)
    assert manifest.stat().st_mtime_ns != first
    cohorts = catalog.phantom_cohorts("smoke", tmp_path, held_out=("dcis",))   # cohorts follow the new render
    assert json.loads((manifest.parent / "cohorts.json").read_text())["source"]["version"] == writer.PHANTOM_VERSION
    assert set(read_manifest(cohorts["pretrain"])["image"]) <= set(read_manifest(manifest)["image"])


def test_catalog_writes_cohort_manifests_once(tmp_path):
    paths = catalog.phantom_cohorts("smoke", tmp_path, held_out=("dcis",))
    assert set(paths) == {"pretrain", "dcis"}
    stamp = paths["dcis"].stat().st_mtime_ns
    assert catalog.phantom_cohorts("smoke", tmp_path, held_out=("dcis",)) == paths
    assert paths["dcis"].stat().st_mtime_ns == stamp
    available = (read_manifest(paths["dcis"])["split"] == "train").sum()
    shots = read_manifest(catalog.few_shot_manifest(paths["dcis"], 34))
    assert len(shots) == min(34, available) and (shots["subtype"] == "dcis").all()
