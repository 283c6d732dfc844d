"""One fold of the real-data study (experiments/held_out.py), run on phantoms as pool and held-out set."""

import pandas as pd

from busgen_lib.experiments import generalisation as g


def test_a_fold_trains_each_model_once_and_its_generated_arm_is_the_reference_lever(small_phantom, tiny_phantom,
                                                                                    tmp_path, one_thread):
    from busgen_lib.experiments.held_out import run_fold

    sampling = {"steps": 2, "guidance": 1.0}
    fold = run_fold("phantom", small_phantom, tiny_phantom, tmp_path, "smoke", [0, 1], 32, sampling)
    # the smoke study's levers: image counts, a guidance weight and two generator variants, trained beside BUSGen
    assert [lever.name for lever in fold.levers] == ["32 images (reference)", "16 images", "64 images",
                                                     "guidance 0.0", "12 steps", "16 px"]
    assert sorted(p.name for p in (tmp_path / "busgen").iterdir()) == [
        "lodo_without_phantom", "lodo_without_phantom-12-steps", "lodo_without_phantom-16-px"]
    reference = fold.lever_sets["32 images (reference)"]
    arms, tests = g.design(small_phantom, tiny_phantom, reference)
    assert fold.arms.keys() == arms.keys() and fold.tests.keys() == tests.keys()
    for name in arms:
        pd.testing.assert_frame_equal(fold.arms[name], arms[name])
    assert fold.arms[g.GENERATED]["image"].tolist() == reference["image"].tolist()
    runs = fold.scores.groupby(["model", "arm"])["seed"].unique().apply(sorted).to_dict()
    assert runs == {("BUS-DM", g.REAL): [0, 1], ("BUS-DM", g.GENERATED): [0, 1], ("BUS-DM", g.BOTH): [0, 1],
                    ("Baseline-CLIP", g.REAL): [0, 1]}
    assert set(fold.scores["test"]) == {"internal", "external"}
    assert set(fold.labelled["arm"]) == {f"BUS-DM · {g.REAL}", f"BUS-DM · {g.GENERATED}", f"BUS-DM · {g.BOTH}",
                                         f"Baseline-CLIP · {g.REAL}"}
    assert len(list((tmp_path / "lodo" / "phantom" / "cv").glob("cv-*.json"))) == 3  # one choice per arm
    assert len(list((tmp_path / "lodo" / "phantom" / "clip").glob("clip-*.pt"))) == 1  # shared by both seeds

    # a rerun finds everything: no model, image, choice or score is written again (the image counts share one
    # sample of 64; a sampling folder's manifest, merged from its shards, is rewritten the same)
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")
            if (p.suffix in {".csv", ".pt", ".safetensors", ".png"} or p.name.startswith("cv-"))
            and p.name != "manifest.csv"}
    assert sum(p.suffix == ".png" for p in kept) == 64 + 3 * 32 and sum(p.suffix == ".pt" for p in kept) == 1
    again = run_fold("phantom", small_phantom, tiny_phantom, tmp_path, "smoke", [0, 1], 32, sampling)
    pd.testing.assert_frame_equal(again.scores, fold.scores)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
