"""Control measures and their probes, on a small phantom: the probes work on real images, and the metrics can fail."""

import numpy as np
import pandas as pd
import pytest
import torch

from busgen_lib.data.dataset import BUSDataset, boxes_to_mask
from busgen_lib.data.manifest import read_manifest
from busgen_lib.data.phantom import write_phantom
from busgen_lib.data.schema import parse_boxes
from busgen_lib.data.dataset import load_images, load_masks
from busgen_lib.evaluate.control import (
    ControlResult, box_control, device_control, fit_control_probes, lesion_box, pathology_control,
)
from busgen_lib.evaluate.probes import train_classifier

SIZE = 32  # the smoke profile's resolution; the phantom is rendered at 64 and resized, as for real data


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> pd.DataFrame:
    return read_manifest(write_phantom(tmp_path_factory.mktemp("control"), n=400, size=64, seed=11, progress=False))


@pytest.fixture(scope="session")
def probes(phantom):
    # One intra-op thread: these nets are too small to gain from two, and on a shared, oversubscribed
    # CI machine two OpenMP threads spin-wait and run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_control_probes(phantom, size=SIZE, seed=0, epochs=20, seg_epochs=15, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def held_out(phantom):
    """The real test split: its rows and images."""
    df = phantom[phantom["split"] == "test"]
    df.attrs = dict(phantom.attrs)
    return df, load_images(df, SIZE)


def lesion_rows(df):
    return np.array([len(parse_boxes(b)) > 0 for b in df["boxes"]])


def to_opposite_side(boxes):
    """Each box moved by half the image towards the other half, horizontally and vertically."""
    out = []
    for x0, y0, x1, y1 in parse_boxes(boxes):
        dx = 0.5 if (x0 + x1) / 2 < 0.5 else -0.5
        dy = 0.5 if (y0 + y1) / 2 < 0.5 else -0.5
        out.append([min(max(v, 0.0), 1.0) for v in (x0 + dx, y0 + dy, x1 + dx, y1 + dy)])
    return out


# --------------------------------------------------------------------------- loading

def test_load_images_is_the_dataset_view_without_augmentation(phantom):
    images = load_images(phantom.iloc[:5], SIZE)
    dataset = BUSDataset(phantom, image_size=SIZE)
    assert torch.equal(images, torch.stack([dataset[i]["image"] for i in range(5)]))


def test_load_masks_uses_mask_files_and_falls_back_to_boxes(phantom):
    rows = phantom.iloc[:20]
    masks = load_masks(rows, SIZE)
    lesion = lesion_rows(rows)
    assert masks.dtype == torch.bool and masks[lesion].flatten(1).any(1).all() and not masks[~lesion].any()
    boxes = load_masks(rows.drop(columns="mask"), SIZE)
    i = int(np.flatnonzero(lesion)[0])
    expected = boxes_to_mask(torch.tensor(parse_boxes(rows["boxes"].iloc[i])), SIZE) > 0
    assert torch.equal(boxes[i], expected)
    assert (masks[i] & ~boxes[i]).sum() <= 0.1 * masks[i].sum()  # the lesion lies within its boxes


# --------------------------------------------------------------------------- probes on real images

def test_pathology_probe_beats_chance_on_held_out_real_images(probes):
    assert probes.pathology.classes == ("normal", "benign", "malignant")
    assert probes.pathology.reference_accuracy > 0.6


def test_device_probe_beats_chance_on_held_out_real_images(probes):
    assert len(probes.device.classes) == 18
    assert probes.device.reference_accuracy > 0.4  # chance 1/18


def test_segmenter_dice_on_held_out_real_lesions(probes):
    assert probes.segmenter.reference_dice > 0.5


def test_report_lists_every_probe(probes):
    assert list(probes.report["probe"]) == ["pathology classifier", "device classifier", "lesion segmenter",
                                            "lesion segmenter"]
    assert probes.report["real_test"].notna().all()


def test_probe_training_is_deterministic_per_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 1, 16, 16, generator=g) * 2 - 1
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    p1 = train_classifier(x, y, 2, epochs=2, seed=3, val_fraction=0.25, progress=False).predict_proba(x)
    p2 = train_classifier(x, y, 2, epochs=2, seed=3, val_fraction=0.25, progress=False).predict_proba(x)
    p3 = train_classifier(x, y, 2, epochs=2, seed=4, val_fraction=0.25, progress=False).predict_proba(x)
    assert p1.shape == (48, 2) and np.allclose(p1.sum(1), 1)
    assert np.array_equal(p1, p2) and not np.allclose(p1, p3)


# --------------------------------------------------------------------------- box control

def test_box_control_is_high_with_true_boxes_and_low_with_boxes_on_the_opposite_side(probes, held_out):
    df, images = held_out
    lesion = lesion_rows(df)
    images = images[torch.from_numpy(lesion)]
    true = box_control(probes.segmenter, images, df["boxes"][lesion].tolist(), df["pathology"][lesion].tolist())
    moved = box_control(probes.segmenter, images, [to_opposite_side(b) for b in df["boxes"][lesion]])
    assert true.value > 0.8 and true.extra["mean_iou"] > 0.4
    assert moved.value < 0.3 and moved.extra["mean_iou"] < 0.1
    assert true.ci[0] <= true.value <= true.ci[1] and true.n == lesion.sum()
    assert set(true.per_class["pathology"]) == {"benign", "malignant"}
    assert true.per_class["n"].sum() == true.n and 0 < true.chance < 0.2


def test_box_control_ignores_images_without_boxes_and_counts_no_lesion_as_failure():
    class Blind:
        reference_box_hit = None

        def predict_mask(self, images):
            return np.zeros((len(images), 8, 8), dtype=bool)

    images = torch.zeros(3, 1, 8, 8)
    result = box_control(Blind(), images, ["[[0.1, 0.1, 0.5, 0.5]]", "[]", [[0.0, 0.0, 1.0, 1.0]]])
    assert (result.value, result.n, result.extra["lesion_found"]) == (0.0, 2, 0.0)
    with pytest.raises(ValueError, match="no image has a requested box"):
        box_control(Blind(), images[:1], ["[]"])


def test_lesion_box_takes_the_largest_component():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, 0] = True                 # a speck
    mask[4:8, 2:4] = True             # the lesion: rows 4..7, cols 2..3
    (cx, cy), box = lesion_box(mask)
    assert (cx, cy) == pytest.approx((0.3, 0.6)) and box == pytest.approx((0.2, 0.4, 0.4, 0.8))
    assert lesion_box(np.zeros((4, 4), dtype=bool)) is None


# --------------------------------------------------------------------------- label control

def test_pathology_control_on_real_images_reaches_the_reference_and_shuffled_labels_fall_to_chance(probes, held_out):
    df, images = held_out
    true = pathology_control(probes.pathology, images, df["pathology"].tolist())
    assert true.value == pytest.approx(probes.pathology.reference_accuracy) and true.reference == true.value
    shuffled = np.random.default_rng(0).permutation(df["pathology"].to_numpy())
    chance = pathology_control(probes.pathology, images, shuffled)
    assert chance.value < chance.chance + 0.1 and chance.value < true.value - 0.25
    assert set(true.per_class["requested"]) == set(df["pathology"])
    assert (true.per_class["correct"].sum(), true.per_class["n"].sum()) == (round(true.value * true.n), true.n)


def test_device_control_on_real_images_matches_the_reference(probes, held_out):
    df, images = held_out
    result = device_control(probes.device, images, df["device"].tolist())
    assert result.value == pytest.approx(probes.device.reference_accuracy)
    frame = result.to_frame()
    assert list(frame.columns[:7]) == ["measure", "value", "ci_lo", "ci_hi", "n", "chance", "real_reference"]


def test_unknown_requested_class_is_an_error(probes, held_out):
    _, images = held_out
    with pytest.raises(ValueError, match="not among the classifier's classes"):
        pathology_control(probes.pathology, images[:2], ["benign", "cyst"])


def test_evaluate_runs_every_measure_on_a_manifest(probes, held_out):
    df, images = held_out
    results = probes.evaluate(df, images)
    assert [r.name.split()[0] for r in results] == ["box", "pathology", "device"]
    assert all(isinstance(r, ControlResult) for r in results)
    assert pd.concat([r.to_frame() for r in results])["value"].between(0, 1).all()

