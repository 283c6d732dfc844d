import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare

from busgen_lib.data.dataset import BUSDataset, boxes_to_mask, class_balanced_sampler, derive_seed, load_grayscale
from busgen_lib.errors import DataError

S = 32


def _write(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path.name


def _manifest(tmp_path, rows):
    """rows: (pathology, device, boxes); images are 40x56 random gray PNGs."""
    rng = np.random.default_rng(0)
    records = []
    for i, (pathology, device, boxes) in enumerate(rows):
        name = _write(tmp_path / f"img{i}.png", rng.integers(0, 256, (40, 56), dtype=np.uint8))
        records.append({"image": name, "pathology": pathology, "device": device, "boxes": json.dumps(boxes),
                        "split": "train"})
    df = pd.DataFrame(records)
    df.attrs["root"] = str(tmp_path)
    return df


ROWS = [
    ("normal", "", []),
    ("benign", "GE", [[0.2, 0.2, 0.5, 0.6]]),
    ("malignant", "Siemens", [[0.1, 0.1, 0.3, 0.3], [0.5, 0.4, 0.9, 0.95]]),
]


@pytest.fixture
def df(tmp_path):
    return _manifest(tmp_path, ROWS)


# --------------------------------------------------------------------------- boxes_to_mask

def _reference_mask(boxes, height, width):
    mask = np.zeros((height, width), dtype=np.float32)
    for x0, y0, x1, y1 in boxes:
        for r in range(height):
            for c in range(width):
                if x0 <= (c + 0.5) / width < x1 and y0 <= (r + 0.5) / height < y1:
                    mask[r, c] = 1.0
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_boxes_to_mask_matches_the_pixel_centre_reference(seed):
    rng = np.random.default_rng(seed)
    corners = rng.random((3, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)  # x0 y0 x1 y1
    got = boxes_to_mask(torch.tensor(boxes, dtype=torch.float32), (12, 17))
    np.testing.assert_array_equal(got.numpy(), _reference_mask(boxes.astype(np.float32), 12, 17))


def test_boxes_to_mask_edges_are_half_open_and_padding_is_empty():
    mask = boxes_to_mask(torch.tensor([[0.375, 0.0, 0.625, 1.0], [0.0, 0.0, 0.0, 0.0]]), 4)
    # centres 0.125, 0.375, 0.625, 0.875: only column 1 lies in [0.375, 0.625)
    assert mask.tolist() == [[0.0, 1.0, 0.0, 0.0]] * 4


def test_boxes_to_mask_broadcasts_over_a_batch():
    low, high = torch.rand(3, 2, 2) * 0.5, 0.5 + torch.rand(3, 2, 2) * 0.5
    boxes = torch.cat([low, high], dim=-1)  # (batch 3, 2 boxes, x0 y0 x1 y1)
    batched = boxes_to_mask(boxes, 8)
    assert batched.shape == (3, 8, 8)
    for b in range(3):
        torch.testing.assert_close(batched[b], boxes_to_mask(boxes[b], 8))


# --------------------------------------------------------------------------- samples

@pytest.mark.parametrize("train", [False, True])
def test_sample_keys_dtypes_shapes_and_box_mask_agree_with_boxes(df, train):
    ds = BUSDataset(df, image_size=S, train=train)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (1, S, S)
        assert s["pathology"].dtype == torch.int64 and s["device"].dtype == torch.int64
        assert s["boxes"].shape == (4, 4) and s["boxes"].dtype == torch.float32
        assert s["box_valid"].dtype == torch.bool and s["box_valid"].sum() == len(ROWS[i][2])
        assert (s["boxes"][~s["box_valid"]] == 0).all()
        assert s["box_mask"].shape == (1, S, S)
        torch.testing.assert_close(s["box_mask"][0], boxes_to_mask(s["boxes"][s["box_valid"]], S))
        torch.testing.assert_close(s["box_mask"][0], boxes_to_mask(s["boxes"], S))  # padding adds nothing
        assert s["index"] == i


def test_pathology_indices_reserve_zero_for_the_null_token(df):
    ds = BUSDataset(df, image_size=S)
    assert [int(ds[i]["pathology"]) for i in range(3)] == [1, 2, 3]


def test_device_indices_follow_the_sorted_default_vocab_with_empty_as_null(df):
    ds = BUSDataset(df, image_size=S)
    assert ds.device_vocab == ("GE", "Siemens")
    assert [int(ds[i]["device"]) for i in range(3)] == [0, 1, 2]


def test_an_explicit_device_vocab_sets_the_indices(df):
    ds = BUSDataset(df, image_size=S, device_vocab=["Philips", "Siemens", "GE"])
    assert [int(ds[i]["device"]) for i in range(3)] == [0, 3, 2]


def test_unknown_device_is_an_error_naming_row_and_vocab(df):
    # Row numbers are 1-based manifest rows, as `validate` counts: 'Siemens' is the third row.
    with pytest.raises(DataError, match=r"row 3 .*'Siemens'.*GE, Philips"):
        BUSDataset(df, image_size=S, device_vocab=["GE", "Philips"])


def test_more_boxes_than_slots_keeps_the_largest(tmp_path):
    boxes = [[0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.6, 0.6], [0.7, 0.7, 0.75, 0.75], [0.1, 0.5, 0.4, 0.7]]
    df = _manifest(tmp_path, [("benign", "GE", boxes)])
    s = BUSDataset(df, image_size=S, max_boxes=2)[0]
    assert s["box_valid"].tolist() == [True, True]
    torch.testing.assert_close(s["boxes"], torch.tensor([boxes[1], boxes[3]]))


def test_missing_root_is_refused_with_advice():
    df = pd.DataFrame({"image": ["a.png"], "pathology": ["benign"], "device": ["GE"], "boxes": ["[]"]})
    with pytest.raises(ValueError, match="root"):
        BUSDataset(df, image_size=S)


# --------------------------------------------------------------------------- determinism

def test_same_seed_epoch_index_gives_the_same_sample_and_a_new_epoch_a_new_one(df):
    a, b = BUSDataset(df, image_size=S, train=True, seed=7), BUSDataset(df, image_size=S, train=True, seed=7)
    for key in ("image", "boxes", "box_mask"):
        torch.testing.assert_close(a[2][key], b[2][key], rtol=0, atol=0)
    before = a[2]["image"]
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], before)
    a.set_epoch(0)
    torch.testing.assert_close(a[2]["image"], before, rtol=0, atol=0)


def test_augmentation_is_the_same_through_dataloader_workers(df):
    ds = BUSDataset(df, image_size=S, train=True, seed=3)
    ds.set_epoch(4)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batch = next(iter(loader))
    torch.testing.assert_close(batch["image"], torch.stack([ds[i]["image"] for i in range(3)]), rtol=0, atol=0)


def test_evaluation_samples_ignore_seed_and_epoch(df):
    a, b = BUSDataset(df, image_size=S, seed=1), BUSDataset(df, image_size=S, seed=2)
    b.set_epoch(9)
    torch.testing.assert_close(a[1]["image"], b[1]["image"], rtol=0, atol=0)


def test_derive_seed_separates_its_keys():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, 1, 2), derive_seed(0, 2, 1), derive_seed(1, 1, 2), derive_seed(0, 12)}) == 4


# --------------------------------------------------------------------------- image loading

def _luma(rgb):
    return (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000


def test_rgb_and_rgba_load_as_601_luma(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((1, 5, 1), 77, np.uint8)], axis=-1)
    for array in (rgb, rgba):
        got = load_grayscale(tmp_path / _write(tmp_path / f"c{array.shape[-1]}.png", array))
        assert got.shape == (1, 1, 5)
        np.testing.assert_allclose(got[0].numpy(), _luma(rgb.astype(float)) / 255, atol=1 / 255)
        assert got.min() == 0.0 and got.max() == 1.0


def test_sixteen_bit_png_spans_the_unit_range(tmp_path):
    array = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    got = load_grayscale(tmp_path / _write(tmp_path / "d16.png", array))
    np.testing.assert_allclose(got[0].numpy(), array / 65535, rtol=1e-6)


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA", "I;16"])
def test_dataset_images_span_minus_one_to_one(tmp_path, kind):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    arrays = {
        "L": (ramp * 255).round().astype(np.uint8),
        "RGB": np.repeat((ramp * 255).round().astype(np.uint8)[..., None], 3, axis=-1),
        "RGBA": np.concatenate([np.repeat((ramp * 255).round().astype(np.uint8)[..., None], 3, axis=-1),
                                np.zeros((64, 64, 1), np.uint8)], axis=-1),
        "I;16": (ramp * 65535).round().astype(np.uint16),
    }
    name = _write(tmp_path / "x.png", arrays[kind])
    df = pd.DataFrame({"image": [name], "pathology": ["normal"], "device": [""], "boxes": ["[]"]})
    image = BUSDataset(df, root=tmp_path, image_size=64)[0]["image"]
    assert image.min() == pytest.approx(-1.0, abs=1e-3) and image.max() == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- class-balanced sampler

def _imbalanced(n=1000):
    return pd.DataFrame({"pathology": ["normal"] * (n * 7 // 10) + ["benign"] * (n * 2 // 10) + ["malignant"] * (n // 10)})


def _class_counts(df, indices):
    return df["pathology"].iloc[list(indices)].value_counts().reindex(["normal", "benign", "malignant"]).to_numpy()


@pytest.mark.parametrize("epoch", range(3))
def test_balanced_sampler_draws_classes_uniformly(epoch):
    df = _imbalanced()
    sampler = class_balanced_sampler(df, epoch=epoch, seed=0)
    indices = list(sampler)
    assert len(indices) == len(df)
    assert chisquare(_class_counts(df, indices)).pvalue > 0.01
    assert chisquare(_class_counts(df, range(len(df)))).pvalue < 1e-6  # the plain order is far from balanced


def test_balanced_sampler_is_deterministic_per_seed_and_epoch():
    df = _imbalanced()
    first = list(class_balanced_sampler(df, epoch=2, seed=5))
    sampler = class_balanced_sampler(df, epoch=2, seed=5)
    assert list(sampler) == first and list(sampler) == first  # re-iterating replays the epoch
    sampler.set_epoch(3)
    assert list(sampler) != first
    assert list(class_balanced_sampler(df, epoch=2, seed=6)) != first


def test_balanced_sampler_of_a_dataset_equals_that_of_its_manifest(df):
    ds = BUSDataset(df, image_size=S)
    assert list(class_balanced_sampler(ds, epoch=1, seed=4)) == list(class_balanced_sampler(df, epoch=1, seed=4))
