"""The lever study (experiments/levers.py): FLOP costs against their closed forms, the paired table against scipy."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats as sps
import torch


def test_sampling_flops_double_with_guidance_and_grow_with_solver_steps(smoke_model, one_thread):
    from busgen_lib.experiments.levers import sampling_flops

    plain = sampling_flops(smoke_model, {"guidance": 0.0, "steps": 4})
    assert plain > 0
    # eq. 2 with w > 0 runs the network on the conditional and the unconditional batch: twice the FLOPs
    assert sampling_flops(smoke_model, {"guidance": 1.8, "steps": 4}) == 2 * plain
    # the solver evaluates the network once per step
    assert sampling_flops(smoke_model, {"guidance": 0.0, "steps": 8}) == 2 * plain


def test_the_sampling_rate_is_timed_on_one_thread_and_restores_the_thread_count(smoke_model, monkeypatch):
    import busgen_lib.experiments.levers as levers_module

    threads, sample, seen = torch.get_num_threads(), levers_module.pipeline.sample_images, []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return sample(*args, **kwargs)

    monkeypatch.setattr(levers_module.pipeline, "sample_images", spy)
    torch.set_num_threads(2)
    try:
        rate = levers_module.sampling_rate(smoke_model, {"guidance": 0.0, "steps": 2}, n=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen[0] == 1 and rate > 0  # the timed sampling (then the FLOP count, at the caller's threads)


def test_lever_costs_follow_steps_images_and_epochs(smoke_model, tiny_phantom, one_thread):
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.experiments.coldit import unet_step_flops
    from busgen_lib.experiments.levers import Lever, classifier_flops_per_image, lever_costs, sampling_flops

    sampling = {"guidance": 0.0, "steps": 2}
    levers = [Lever("few", smoke_model, 4, sampling), Lever("more", smoke_model, 12, sampling)]
    costs = lever_costs(levers, tiny_phantom, "smoke", epochs=3).set_index("lever")
    run = json.loads((smoke_model.parent / "run.json").read_text())
    # the run's steps at its own batch (4, not the profile's 8): FLOPs are linear in the batch
    expected_generator = run["steps"] * unet_step_flops(read_manifest(tiny_phantom), "smoke") * run["batch_size"] / 8 / 1e12
    assert costs["generator TFLOP"].tolist() == pytest.approx([expected_generator] * 2)
    one_image = sampling_flops(smoke_model, sampling) / 1e12
    assert costs["sampling TFLOP"].tolist() == pytest.approx([4 * one_image, 12 * one_image])
    per_image = classifier_flops_per_image("smoke") / 1e12
    assert costs["BUS-DM TFLOP"].tolist() == pytest.approx([4 * 3 * per_image, 12 * 3 * per_image])
    assert costs["total TFLOP"].tolist() == pytest.approx(
        costs[["generator TFLOP", "sampling TFLOP", "BUS-DM TFLOP"]].sum(axis=1).tolist())


def test_run_record_needs_a_pretrain_run(tmp_path):
    from busgen_lib.errors import DataError
    from busgen_lib.experiments.levers import run_record

    (tmp_path / "model").mkdir()
    with pytest.raises(DataError, match="no run.json"):
        run_record(tmp_path / "model")
    (tmp_path / "run.json").write_text(json.dumps({"steps": 1500}))
    assert run_record(tmp_path / "model") == {"steps": 1500}


def test_generator_variants_train_beside_the_reference_and_cost_their_own_network(smoke_model, tiny_phantom,
                                                                                   one_thread):
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.diffusion.checkpoint import load_model
    from busgen_lib.errors import UsageError
    from busgen_lib.experiments.coldit import unet_step_flops
    from busgen_lib.experiments.levers import lever_costs, lever_sets, one_knob_levers, pretrain_variants

    variants = {"3 steps": {"train": {"steps": 3, "batch_size": 4}},
                "16 px": {"train": {"steps": 2, "batch_size": 4}, "model": {"image_size": 16}}}
    folders = pretrain_variants(tiny_phantom, "smoke", smoke_model, variants)
    assert {name: folder.parent.name for name, folder in folders.items()} == {
        "3 steps": f"{smoke_model.parent.name}-3-steps", "16 px": f"{smoke_model.parent.name}-16-px"}
    assert all(folder.parent.parent == smoke_model.parent.parent for folder in folders.values())
    assert load_model(folders["16 px"]).config.image_size == 16
    assert load_model(folders["3 steps"]).config.image_size == 32
    weights = folders["3 steps"] / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert pretrain_variants(tiny_phantom, "smoke", smoke_model, variants, workers=1) == folders
    assert weights.stat().st_mtime_ns == stamp  # finished runs are found, not retrained

    levers = one_knob_levers(smoke_model, 4, {"steps": 2}, generators=folders)
    assert [(lever.name, lever.generator, lever.n) for lever in levers] == [
        ("4 images (reference)", smoke_model, 4), ("3 steps", folders["3 steps"], 4), ("16 px", folders["16 px"], 4)]
    costs = lever_costs(levers, tiny_phantom, "smoke", epochs=1).set_index("lever")["generator TFLOP"]
    df = read_manifest(tiny_phantom)
    at_32, at_16 = unet_step_flops(df, "smoke") / 2, unet_step_flops(df, "smoke", image_size=16) / 2  # batch 4 of 8
    assert costs.tolist() == pytest.approx([2 * at_32 / 1e12, 3 * at_32 / 1e12, 2 * at_16 / 1e12])
    assert at_16 < at_32 / 3  # a quarter of the pixels (attention grows faster, convolutions exactly x4)
    images = lever_sets(levers[2:], smoke_model.parent.parent / "variant_sets")["16 px"]
    from PIL import Image
    assert Image.open(images["image"].iloc[0]).size == (16, 16)

    with pytest.raises(UsageError, match="unknown keys \\['steps'\\]"):
        pretrain_variants(tiny_phantom, "smoke", smoke_model, {"bad": {"steps": 3}})


def _per_seed(aucs: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"arm": arm, "test": test, "seed": seed, "auc": auc + (0.1 if test == "internal" else 0.0)}
                         for arm, values in aucs.items() for seed, auc in enumerate(values)
                         for test in ("internal", "external")])


def test_lever_table_pairs_seeds_and_prices_the_gain():
    from busgen_lib.experiments.levers import lever_table

    aucs = {"600 images": [0.60, 0.58, 0.62], "1200 images": [0.65, 0.61, 0.66], "guidance 0": [0.55, 0.57, 0.61],
            "guidance 5": [0.62, 0.60, 0.65]}
    costs = pd.DataFrame({"lever": list(aucs), "total TFLOP": [60.0, 90.0, 45.0, 60.0]})
    rate = 50e9  # FLOP/s
    table = lever_table(_per_seed(aucs), costs, "600 images", rate)
    assert table["lever"].tolist() == list(aucs)  # in the levers' order, not alphabetical
    table = table.set_index("lever")
    assert table.loc["600 images", "external AUC"] == pytest.approx(0.60)
    assert table.loc["1200 images", "internal AUC"] == pytest.approx(0.74)  # the other test, shown beside
    assert np.isnan(table.loc["600 images", "diff_mean"])
    more = table.loc["1200 images"]
    t = sps.ttest_rel(aucs["1200 images"], aucs["600 images"])
    assert more["diff_mean"] == pytest.approx(0.04)
    assert more["t_p"] == pytest.approx(t.pvalue)
    assert more["extra CPU-min"] == pytest.approx(30e12 / rate / 60)  # 10 CPU-minutes
    assert more["AUC per CPU-min"] == pytest.approx(0.04 / 10)
    assert table.loc["guidance 0", "extra CPU-min"] == pytest.approx(-5.0)
    # cheaper: the AUC its 5 saved minutes give up, per minute
    assert table.loc["guidance 0", "AUC per CPU-min"] == pytest.approx((-0.07 / 3) / -5.0)
    assert table.loc["guidance 5", "diff_mean"] == pytest.approx(0.07 / 3)
    assert np.isnan(table.loc["guidance 5", "AUC per CPU-min"])  # as dear as the reference: a free gain, no rate


def test_lever_table_and_sets_refuse_bad_levers(smoke_model, tmp_path):
    from busgen_lib.errors import UsageError
    from busgen_lib.experiments.levers import Lever, lever_sets, lever_table

    costs = pd.DataFrame({"lever": ["a"], "total TFLOP": [1.0]})
    with pytest.raises(UsageError, match="reference lever 'b'"):
        lever_table(_per_seed({"a": [0.5, 0.6]}), costs, "b", 1e9)
    with pytest.raises(UsageError, match="must differ"):
        lever_sets([Lever("x", smoke_model, 2), Lever("x", smoke_model, 4)], tmp_path)


def test_each_lever_samples_its_set_and_is_scored_per_seed(smoke_model, tmp_path, one_thread):
    from busgen_lib.data.dataset import load_images
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.diffusion.pipeline import sample_dataset
    from busgen_lib.downstream.recipes import train_fn
    from busgen_lib.downstream.tasks import Task
    from busgen_lib.experiments.generalisation import absolute
    from busgen_lib.experiments.levers import Lever, lever_scores, lever_sets

    plain = {"guidance": 0.0, "steps": 2}
    levers = [Lever("4 images", smoke_model, 4, plain), Lever("8 images", smoke_model, 8, plain),
              Lever("guidance 3", smoke_model, 6, {"guidance": 3.0, "steps": 2})]
    sets = lever_sets(levers, tmp_path / "sets")
    assert {name: len(df) for name, df in sets.items()} == {"4 images": 4, "8 images": 8, "guidance 3": 6}
    assert len(list((tmp_path / "sets").iterdir())) == 2  # the two image counts share one sample
    assert all(set(df["pathology"]) == {"benign", "malignant"} for df in sets.values())
    # the 4-image lever is exactly the set that sampling 4 images gives
    alone = absolute(read_manifest(sample_dataset(smoke_model, 4, tmp_path / "alone", pathologies=("benign", "malignant"),
                                                  **plain)))
    assert sets["4 images"]["pathology"].tolist() == alone["pathology"].tolist()
    assert torch.equal(load_images(sets["4 images"], 32), load_images(alone, 32))
    settings = json.loads(next((tmp_path / "sets").glob("*guidance3.0*")).joinpath("settings.json").read_text())
    assert settings["guidance"] == 3.0
    tests = {"external": pd.concat([sets["8 images"], sets["guidance 3"]], ignore_index=True)}
    per_seed = lever_scores(sets, tests, train_fn("bus-dm", Task.parse("benign-malignant"), "smoke"), [0, 1],
                            tmp_path / "scores")
    assert sorted(per_seed["arm"].unique()) == ["4 images", "8 images", "guidance 3"]
    assert per_seed.groupby("arm")["seed"].nunique().tolist() == [2, 2, 2]
    assert per_seed["auc"].between(0, 1).all()


def test_a_folder_holding_a_larger_sample_serves_a_smaller_lever(smoke_model, tmp_path, one_thread):
    from busgen_lib.diffusion.generate import read_plan
    from busgen_lib.experiments.levers import Lever, lever_sets

    plain = {"guidance": 0.0, "steps": 2}
    larger = lever_sets([Lever("8 images", smoke_model, 8, plain)], tmp_path)["8 images"]
    (folder,) = tmp_path.iterdir()
    images = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}
    smaller = lever_sets([Lever("4 images", smoke_model, 4, plain)], tmp_path)["4 images"]  # not refused
    pd.testing.assert_frame_equal(smaller, larger.iloc[:4])
    assert len(read_plan(folder)) == 8 and {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} == images


def test_one_knob_levers_move_one_setting_each_from_the_reference(tmp_path):
    from busgen_lib.experiments.levers import one_knob_levers

    sampling = {"sampler": "dpmsolver++", "steps": 12, "order": 2, "guidance": 1.8}
    levers = one_knob_levers(tmp_path, 600, sampling, images=(300, 1200), guidance=(0.0, 3.5))
    assert [lever.name for lever in levers] == ["600 images (reference)", "300 images", "1200 images",
                                                 "guidance 0.0", "guidance 3.5"]
    assert [lever.n for lever in levers] == [600, 300, 1200, 600, 600]
    assert [lever.sampling["guidance"] for lever in levers] == [1.8, 1.8, 1.8, 0.0, 3.5]
    assert all(lever.sampling["steps"] == 12 and lever.generator == tmp_path for lever in levers)
    assert sampling["guidance"] == 1.8  # the reference's options are not changed in place


def test_the_lever_study_tables_every_lever_against_the_first(smoke_model, tiny_phantom, tmp_path, one_thread):
    from busgen_lib.downstream.recipes import train_fn
    from busgen_lib.downstream.tasks import Task
    from busgen_lib.experiments.levers import lever_sets, lever_study, one_knob_levers

    levers = one_knob_levers(smoke_model, 8, {"steps": 2}, images=(4,), guidance=(0.0,))
    test = lever_sets(levers[:1], tmp_path / "test", seed=1)[levers[0].name]  # other seed: other images
    table = lever_study(levers, tiny_phantom, {"external": test}, train_fn("bus-dm", Task.parse("benign-malignant"),
                                                                           "smoke"), [0, 1], "smoke", tmp_path / "study")
    assert table["lever"].tolist() == ["8 images (reference)", "4 images", "guidance 0.0"]
    assert table["extra CPU-min"].iloc[0] == 0 and np.isnan(table["diff_mean"].iloc[0])
    assert (table["extra CPU-min"].iloc[1:] < 0).all()  # fewer images, and no unconditional branch: cheaper
    assert table["seeds"].tolist() == [2, 2, 2]

    # given the sets it already has, the study samples nothing and scores them as it would have sampled them
    import busgen_lib.experiments.levers as levers_module

    sets = lever_sets(levers, tmp_path / "study", seed=0)
    original = levers_module.lever_sets
    levers_module.lever_sets = lambda *a, **k: pytest.fail("sampled again")
    try:
        again = lever_study(levers, tiny_phantom, {"external": test},
                            train_fn("bus-dm", Task.parse("benign-malignant"), "smoke"), [0, 1], "smoke",
                            tmp_path / "study", sets=sets)
    finally:
        levers_module.lever_sets = original
    timed = ["CPU-min", "extra CPU-min", "AUC per CPU-min"]  # priced at a rate measured each run
    pd.testing.assert_frame_equal(again.drop(columns=timed), table.drop(columns=timed))


def test_the_lever_figure_keeps_every_label_and_point_apart_at_equal_costs():
    import matplotlib.pyplot as plt

    from busgen_lib.experiments.levers import lever_figure

    table = pd.DataFrame({"lever": ["600 images (reference)", "guidance 3.5", "guidance 7.0", "300 images",
                                    "1200 images", "750 steps", "32 px"],
                          "external AUC": [0.664, 0.621, 0.647, 0.564, 0.662, 0.578, 0.669],
                          "CPU-min": [31.4, 31.4, 31.4, 28.6, 36.9, 18.5, 8.0]})
    table = table.assign(lo=table["external AUC"] - 0.04, hi=table["external AUC"] + 0.04)
    fig = lever_figure(table, "600 images (reference)")
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = list(ax.texts)
    assert sorted(t.get_text() for t in labels) == sorted(table["lever"])
    boxes = [t.get_window_extent(renderer) for t in labels]
    overlapping = [(a.get_text(), b.get_text()) for i, (a, p) in enumerate(zip(labels, boxes))
                   for b, q in zip(labels[i + 1:], boxes[i + 1:]) if p.overlaps(q)]
    assert overlapping == []
    points = {line.get_xydata()[0, 0] for line in ax.lines if line.get_marker() == "o"}
    assert len(points) == len(table)   # equal costs are set side by side, not on one x
    assert all(ax.bbox.x0 <= b.x0 and b.x1 <= ax.bbox.x1 for b in boxes)   # no label leaves the axes
    plt.close(fig)
