"""Detection metrics against faster_coco_eval and hand-computed APs; the detector trains, finds squares, round-trips."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from faster_coco_eval import COCO, COCOeval_faster
from PIL import Image

from busgen_lib.downstream.detector import Detector, train_detector
from busgen_lib.errors import DataError
from busgen_lib.evaluate.detection import (
    _matches,
    average_precision,
    evaluate_detection,
    lesion_boxes,
    paired_bootstrap_p,
    small_area_threshold,
)


# --------------------------------------------------------------------------- references and fixtures

def coco_reference(predictions, targets, max_area):
    """AP50 over lesions with relative area <= max_area, by faster_coco_eval's COCOeval with a custom area range."""
    images, gts, dts = [], [], []
    for j, (p, g) in enumerate(zip(predictions, targets)):
        images.append({"id": j + 1, "width": 1, "height": 1})
        for b in np.reshape(g, (-1, 4)):
            w, h = b[2] - b[0], b[3] - b[1]
            gts.append({"id": len(gts) + 1, "image_id": j + 1, "category_id": 1, "bbox": [b[0], b[1], w, h],
                        "area": w * h, "iscrowd": 0})
        for b, s in zip(np.reshape(p["boxes"], (-1, 4)), p["scores"]):
            w, h = b[2] - b[0], b[3] - b[1]
            dts.append({"id": len(dts) + 1, "image_id": j + 1, "category_id": 1, "bbox": [b[0], b[1], w, h],
                        "area": w * h, "score": float(s), "iscrowd": 0})
    cats = [{"id": 1, "name": "lesion"}]
    gt, dt = COCO(), COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": cats}
    dt.dataset = {"images": images, "annotations": dts, "categories": cats}
    gt.createIndex()
    dt.createIndex()
    logging.disable(logging.WARNING)  # "ranges do not span 0..1e10": intended
    evaluator = COCOeval_faster(gt, dt, "bbox", ranges={"chosen": [0.0, max_area]}, print_function=lambda *a: None)
    logging.disable(logging.NOTSET)
    evaluator.params.iouThrs = np.array([0.5])
    evaluator.params.maxDets = [100]
    evaluator.evaluate()
    evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, 0, 1, 0]  # area range 1 = "chosen"
    return float(precision.mean()) if (precision > -1).all() else math.nan


def random_case(rng, n_images):
    """Random lesions (0–2 per image), noisy detections of them plus random false ones."""
    predictions, targets = [], []
    for _ in range(n_images):
        corner = rng.uniform(0, 0.6, (rng.integers(0, 3), 2))
        gt = np.concatenate([corner, corner + rng.uniform(0.05, 0.4, corner.shape)], axis=1)
        corner = rng.uniform(0, 0.6, (rng.integers(0, 4), 2))
        det = np.concatenate([gt + rng.normal(0, 0.03, gt.shape),
                              np.concatenate([corner, corner + rng.uniform(0.05, 0.4, corner.shape)], axis=1)])
        det = np.clip(det, 0, 1)
        det = np.concatenate([np.minimum(det[:, :2], det[:, 2:]), np.maximum(det[:, :2], det[:, 2:]) + 1e-3], 1)
        predictions.append({"boxes": det, "scores": rng.uniform(0, 1, len(det))})
        targets.append(gt)
    return predictions, targets


def manifest(targets, images=None):
    return pd.DataFrame({"image": images or [f"im{i}.png" for i in range(len(targets))],
                         "boxes": [json.dumps(np.round(t, 6).tolist()) for t in targets]})


# Hand case 1: two lesions found (scores 0.9, 0.7) and a false alarm on a lesion-free image (0.8).
# Ranked TP, FP, TP of 2 lesions: precision 1 up to recall 0.5 (51 of COCO's 101 points), then 2/3.
LESION_A, LESION_B = [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]
HAND_TARGETS = [np.array([LESION_A]), np.array([LESION_B]), np.zeros((0, 4))]
HAND_PREDICTIONS = [{"boxes": np.array([LESION_A]), "scores": np.array([0.9])},
                    {"boxes": np.array([LESION_B]), "scores": np.array([0.7])},
                    {"boxes": np.array([[0.2, 0.2, 0.5, 0.5]]), "scores": np.array([0.8])}]
HAND_AP = (51 * 1.0 + 50 * 2 / 3) / 101

# Hand case 2 (threshold 0.05): image 0 has a small (0.04) and a large (0.16) lesion, image 1 a small one, image 2
# none. Detections: the large lesion (0.95), a small false alarm on image 1 (0.9), a large false alarm on image 2
# (0.8), the small lesion of image 0 (0.6).
SMALL = 0.05
SMALL_TARGETS = [np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]]), np.array([[0.6, 0.1, 0.8, 0.3]]),
                 np.zeros((0, 4))]
SMALL_PREDICTIONS = [{"boxes": np.array([[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.3, 0.3]]), "scores": np.array([0.95, 0.6])},
                     {"boxes": np.array([[0.0, 0.6, 0.2, 0.8]]), "scores": np.array([0.9])},
                     {"boxes": np.array([[0.1, 0.1, 0.6, 0.6]]), "scores": np.array([0.8])}]
# all lesions: TP FP FP TP of 3 -> precision 1 to recall 1/3 (34 points), 1/2 to 2/3 (33 points), then 0
SMALL_CASE_AP = (34 * 1.0 + 33 * 0.5) / 101
# small only: the large lesion's detection and the large false alarm are ignored -> FP TP of 2 lesions:
# precision 1/2 up to recall 1/2 (51 points), then 0
SMALL_CASE_AP_SMALL = 51 * 0.5 / 101


# --------------------------------------------------------------------------- metrics

# torchmetrics returns float32: its APs agree with float64 references to ~1e-7.
TM = 1e-6


def test_ap_equals_hand_computed_value_and_coco():
    ap, _ = average_precision(HAND_PREDICTIONS, HAND_TARGETS, small_threshold=0.01)
    assert ap == pytest.approx(HAND_AP, abs=TM)
    assert ap == pytest.approx(coco_reference(HAND_PREDICTIONS, HAND_TARGETS, 1.0), abs=TM)


def test_detections_on_lesion_free_images_lower_ap():
    ap_with_false_alarm, _ = average_precision(HAND_PREDICTIONS, HAND_TARGETS, 0.01)
    silent = HAND_PREDICTIONS[:2] + [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}]
    ap_silent, _ = average_precision(silent, HAND_TARGETS, 0.01)
    assert ap_silent == pytest.approx(1.0, abs=TM)
    assert ap_with_false_alarm < ap_silent


def test_ap_small_counts_only_small_lesions_with_coco_semantics():
    ap, ap_small = average_precision(SMALL_PREDICTIONS, SMALL_TARGETS, SMALL)
    assert ap == pytest.approx(SMALL_CASE_AP, abs=TM)
    assert ap_small == pytest.approx(SMALL_CASE_AP_SMALL, abs=TM)
    assert ap_small == pytest.approx(coco_reference(SMALL_PREDICTIONS, SMALL_TARGETS, SMALL), abs=TM)


@pytest.mark.parametrize("seed", range(6))
def test_ap_and_ap_small_equal_faster_coco_eval_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    predictions, targets = random_case(rng, int(rng.integers(5, 40)))
    ap, ap_small = average_precision(predictions, targets, 0.03)
    assert ap == pytest.approx(coco_reference(predictions, targets, 1.0), abs=TM)
    assert ap_small == pytest.approx(coco_reference(predictions, targets, 0.03), abs=TM, nan_ok=True)


@pytest.mark.parametrize("seed", range(4))
def test_bootstrap_replicate_equals_coco_on_the_resampled_images(seed):
    rng = np.random.default_rng(seed)
    predictions, targets = random_case(rng, 30)
    draw = rng.integers(0, 30, 30)
    weights = np.bincount(draw, minlength=30).astype(float)
    resampled = ([predictions[i] for i in draw], [targets[i] for i in draw])
    for max_area in (math.inf, 0.03):
        expected = coco_reference(*resampled, 1.0 if max_area == math.inf else max_area)
        assert _matches(predictions, targets, max_area).ap(weights) == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_small_area_threshold_is_the_quantile_of_training_box_areas():
    rng = np.random.default_rng(0)
    _, targets = random_case(rng, 50)
    areas = np.concatenate([(t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]) for t in targets])
    df = manifest(targets)
    assert small_area_threshold(df) == pytest.approx(np.quantile(areas, 0.3), rel=1e-5)
    assert small_area_threshold(df, 0.5) == pytest.approx(np.median(areas), rel=1e-5)


def test_evaluate_detection_reports_ap_with_a_ci_around_it():
    rng = np.random.default_rng(1)
    predictions, targets = random_case(rng, 60)
    result = evaluate_detection(predictions, manifest(targets), small_threshold=0.03, n_boot=200)
    ap, ap_small = average_precision(predictions, [np.round(t, 6) for t in targets], 0.03)
    assert result["ap50"] == pytest.approx(ap) and result["ap50_small"] == pytest.approx(ap_small)
    assert result["ap50_lo"] < result["ap50"] < result["ap50_hi"]
    assert result["ap50_small_lo"] < result["ap50_small"] < result["ap50_small_hi"]
    assert result["n_images"] == 60 and result["n_lesions"] == sum(len(t) for t in targets)


def test_paired_bootstrap_p_separates_a_better_detector_and_not_a_copy():
    rng = np.random.default_rng(2)
    predictions, targets = random_case(rng, 80)
    perfect = [{"boxes": t, "scores": np.ones(len(t))} for t in targets]
    df = manifest(targets)
    better = paired_bootstrap_p(perfect, predictions, df, small_threshold=0.03, n_boot=200)
    assert better["ap50_diff"] > 0 and better["ap50_p"] < 0.01
    same = paired_bootstrap_p(predictions, predictions, df, small_threshold=0.03, n_boot=200)
    assert same["ap50_diff"] == 0 and same["ap50_p"] == 1.0


def test_bad_boxes_are_refused_naming_the_row():
    with pytest.raises(DataError, match="no 'boxes' column"):
        small_area_threshold(pd.DataFrame({"image": ["a.png"]}))
    df = pd.DataFrame({"image": ["a.png", "b.png"], "boxes": ["[[0.1, 0.1, 0.2, 0.2]]", "[[0.5, 0.5, 1.2, 0.9]]"]})
    with pytest.raises(DataError, match=r"row 2 \(b\.png\).*outside 0\.\.1"):
        small_area_threshold(df)
    with pytest.raises(DataError, match=r"row 2 \(b\.png\)"):
        evaluate_detection([{"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}] * 2, df, 0.05, n_boot=10)


# --------------------------------------------------------------------------- the detector

SIZE = 32
SQUARE = 8  # px: a 0.25-wide lesion


def squares(folder, n, seed):
    """Dark speckle with one bright square per image, except every fourth image (lesion-free)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = rng.uniform(0, 60, (SIZE, SIZE))
        boxes = []
        if i % 4:
            x, y = rng.integers(1, SIZE - SQUARE - 1, 2)
            image[y:y + SQUARE, x:x + SQUARE] = rng.uniform(190, 255, (SQUARE, SQUARE))
            boxes = [[x / SIZE, y / SIZE, (x + SQUARE) / SIZE, (y + SQUARE) / SIZE]]
        name = f"s{seed}_{i}.png"
        Image.fromarray(image.astype(np.uint8)).save(folder / name)
        rows.append({"image": name, "boxes": json.dumps(boxes)})
    df = pd.DataFrame(rows)
    df.attrs["root"] = str(folder)
    return df


TINY = dict(image_size=SIZE, feature_index=1, epochs=20, batch_size=8, lr=3e-3)  # stride 4: an 8 x 8 map


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("squares")
    torch.set_num_threads(1)
    train, test = squares(folder, 48, seed=0), squares(folder, 24, seed=1)
    return train_detector(train, "smoke", seed=0, progress=False, **TINY), test


def test_detector_finds_bright_squares(trained):
    detector, test = trained
    result = evaluate_detection(detector, test, small_threshold=0.1, n_boot=10)
    assert result["ap50"] >= 0.85  # measured 0.96; 6 epochs (undertrained) give 0.14, a misaligned detector ~0


def test_save_load_round_trip_predicts_the_same(trained, tmp_path):
    detector, test = trained
    loaded = Detector.load(detector.save(tmp_path / "det"))
    before, after = detector.predict(test), loaded.predict(test)
    assert loaded.settings == detector.settings and loaded.train_fingerprint == detector.train_fingerprint
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        np.testing.assert_array_equal(a["scores"], b["scores"])


def test_training_is_deterministic_given_the_seed(tmp_path):
    torch.set_num_threads(1)
    train = squares(tmp_path, 8, seed=3)
    one = dict(TINY, epochs=1)
    a, b = (train_detector(train, "smoke", seed=5, progress=False, **one) for _ in range(2))
    c = train_detector(train, "smoke", seed=6, progress=False, **one)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_the_image_cache_gives_every_epochs_items_unchanged_and_reads_each_file_once(tmp_path, monkeypatch):
    """Cached and uncached datasets yield equal (augmented) items epoch after epoch; cached, each PNG is read once."""
    from busgen_lib.downstream import detector as detector_module

    train = squares(tmp_path, 6, seed=4)
    boxes, augment = lesion_boxes(train), detector_module._augmentation(detector_module.detector_settings("smoke"))
    reads = []
    real_load = detector_module.load_grayscale
    monkeypatch.setattr(detector_module, "load_grayscale", lambda path: reads.append(path) or real_load(path))
    cached = detector_module.DetectionDataset(train, SIZE, boxes, augment, seed=2)
    monkeypatch.setattr(detector_module, "CACHE_BYTES", 0)
    uncached = detector_module.DetectionDataset(train, SIZE, boxes, augment, seed=2)
    assert cached.cache is not None and uncached.cache is None
    for epoch in range(3):
        cached.epoch = uncached.epoch = epoch
        for i in range(len(train)):
            (a, ta), (b, tb) = cached[i], uncached[i]
            assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert len(reads) == len(train) + 3 * len(train)  # the cached set once, the uncached one every epoch


def test_loading_a_folder_without_a_detector_is_refused(tmp_path):
    with pytest.raises(DataError, match="holds no detector"):
        Detector.load(tmp_path)


def test_head_sizes_and_proposal_counts_reach_the_model():
    from busgen_lib.downstream.detector import build_model
    from busgen_lib.profiles import detector_settings

    settings = detector_settings("smoke", roi_output=3, roi_samples=16, rpn_samples=32, proposals=(50, 20),
                                 head_dim=24)
    model = build_model(settings)
    assert tuple(model.roi_heads.box_roi_pool.output_size) == (3, 3)
    assert model.roi_heads.box_head.fc6.in_features == model.backbone.out_channels * 9
    assert model.roi_heads.box_head.fc6.out_features == 24
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 32
    assert model.rpn._pre_nms_top_n == {"training": 50, "testing": 20} == model.rpn._post_nms_top_n


def test_training_steps_count_the_optimiser_steps_train_detector_takes(tmp_path, monkeypatch):
    from busgen_lib.downstream import detector as detector_module
    from busgen_lib.downstream.detector import training_steps

    taken = []

    class CountingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            taken.append(1)
            return super().step(closure)

    monkeypatch.setattr(detector_module.torch.optim, "AdamW", CountingAdamW)
    torch.set_num_threads(1)
    train = squares(tmp_path, 11, seed=4)  # 11 images in batches of 4: 3 batches per epoch, the last partial
    short = dict(TINY, epochs=2, batch_size=4)
    train_detector(train, "smoke", seed=0, progress=False, **short)
    assert len(taken) == training_steps(train, "smoke", **short) == 6


def test_the_step_matched_control_trains_at_least_as_long_as_the_augmented_arm(tmp_path):
    from busgen_lib.downstream.detector import training_steps
    from busgen_lib.experiments.screening import step_matched_epochs

    real, augmented = squares(tmp_path, 20, seed=5), squares(tmp_path, 52, seed=6)
    epochs = step_matched_epochs(real, augmented, "smoke")
    reference = training_steps(augmented, "smoke")
    assert training_steps(real, "smoke", epochs=epochs) >= reference > training_steps(real, "smoke", epochs=epochs - 1)


def test_the_detection_figure_draws_every_arms_seeds_and_the_papers_values_where_it_has_them():
    from matplotlib.collections import PathCollection

    from busgen_lib.experiments.screening import PAPER_AP, detection_figure

    arms = ["real", "real + generated", "real, as many steps"]
    per_seed = pd.DataFrame([{"arm": a, "seed": s, **{f"{m}{suffix}": 0.5 + 0.1 * k + shift
                                                        for m in PAPER_AP for suffix, shift in
                                                        (("", 0.0), ("_lo", -0.05), ("_hi", 0.05))}}
                             for k, a in enumerate(arms) for s in (0, 1)])
    fig = detection_figure(per_seed)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["real", "real + generated", "real,\nas many steps"]
        points = [c.get_offsets().shape[0] for c in ax.collections if isinstance(c, PathCollection)]
        assert sorted(points) == [1, 1, 2, 2, 2]  # two seeds for each of 3 arms, a paper star for 2 of them


def test_detection_tables_by_test_set_equal_each_set_scored_alone():
    from busgen_lib.experiments.screening import detection_table, detection_tables_by

    rng = np.random.default_rng(4)
    cases = {name: random_case(rng, n) for name, n in (("internal", 30), ("external", 40))}
    frames = {name: manifest(targets, [f"{name}{i}.png" for i in range(len(targets))])
              for name, (_, targets) in cases.items()}
    # two arms, one seed: the second ranks the same boxes in the reverse order of the first
    runs_alone = {name: {("real", 0): predictions,
                         ("real + generated", 0): [{"boxes": p["boxes"], "scores": p["scores"][::-1].copy()}
                                                  for p in predictions]}
                  for name, (predictions, _) in cases.items()}
    test_df = pd.concat([f.assign(test=name) for name, f in frames.items()], ignore_index=True)
    runs = {key: runs_alone["internal"][key] + runs_alone["external"][key] for key in runs_alone["internal"]}
    tables = detection_tables_by(runs, test_df, "test", 0.03, "real", n_boot=100)
    assert list(tables) == ["internal", "external"]
    for name, (per_seed, summary) in tables.items():
        alone, alone_summary = detection_table(runs_alone[name], frames[name], 0.03, "real", n_boot=100)
        pd.testing.assert_frame_equal(per_seed, alone)
        pd.testing.assert_frame_equal(summary, alone_summary)


def test_held_out_detection_scores_internal_and_external_tests_and_resumes(small_phantom, tmp_path, monkeypatch,
                                                                           one_thread):
    from busgen_lib.data.manifest import read_manifest, write_manifest
    from busgen_lib.experiments import screening
    from busgen_lib.experiments.generalisation import absolute

    phantom = absolute(read_manifest(small_phantom))
    pool_path = write_manifest(pd.concat([phantom[phantom["split"] == "train"].head(24),
                                          phantom[phantom["split"] == "test"].head(8)]), tmp_path / "pool.csv")
    held_out = write_manifest(phantom[phantom["split"] == "val"].head(12), tmp_path / "held_out.csv")
    pool = read_manifest(pool_path)
    generated = absolute(pool[pool["split"] == "train"].head(8))  # stands in for generated rows with boxes
    result = screening.held_out_detection(pool_path, held_out, generated, [0], "smoke", tmp_path / "det")
    counts = result.test_df["test"].value_counts().to_dict()
    assert counts == {"internal": 8, "external": 12}
    for test in ("internal", "external"):
        per_seed, _ = result.versus_real[test]
        assert per_seed["arm"].tolist() == ["real", "real + generated", "real, as many steps"]
        assert per_seed["n_images"].unique().tolist() == [counts[test]]
        against_control, _ = result.versus_control[test]
        assert against_control["arm"].tolist() == ["real + generated", "real, as many steps"]
        assert np.isnan(against_control["ap50_p"].iloc[1]) and not np.isnan(against_control["ap50_p"].iloc[0])

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although every detector is saved")

    summary, per_seed, against_control = result.tables()
    assert summary.index.get_level_values("test").unique().tolist() == ["internal", "external"]
    assert len(per_seed) == 6 and against_control["arm"].unique().tolist() == ["real + generated"]

    monkeypatch.setattr(screening, "train_detector", no_training)
    again = screening.held_out_detection(pool_path, held_out, generated, [0], "smoke", tmp_path / "det")
    pd.testing.assert_frame_equal(again.versus_real["external"][0], result.versus_real["external"][0])
