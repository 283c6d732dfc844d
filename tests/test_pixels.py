"""Every stored pixel type becomes the right 0..1 intensity or is refused, in validation and loading alike
(a float TIFF in 0..1 used to load as an all-black image)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busgen_lib.data.dataset import load_grayscale
from busgen_lib.data.manifest import validate_manifest
from busgen_lib.data.schema import REQUIRED_COLUMNS
from busgen_lib.errors import DataError

GRADIENT = np.linspace(0.0, 1.0, 12, dtype=np.float64).reshape(3, 4)  # the intensities every file stores


def _one_row_manifest(tmp_path, image_name):
    path = tmp_path / "manifest.csv"
    row = dict.fromkeys(REQUIRED_COLUMNS, "")
    row.update(image=image_name, patient_id="P1", split="train", pathology="normal", boxes="[]")
    pd.DataFrame([row]).to_csv(path, index=False)
    return path


def _save(tmp_path, name, image: Image.Image):
    image.save(tmp_path / name)
    return tmp_path / name


def test_8_bit_grey_is_divided_by_255(tmp_path):
    stored = np.round(GRADIENT * 255).astype(np.uint8)
    path = _save(tmp_path, "g8.png", Image.fromarray(stored))
    assert np.array_equal(load_grayscale(path)[0].numpy(), stored.astype(np.float32) / 255)


def test_16_bit_grey_is_divided_by_65535(tmp_path):
    stored = np.round(GRADIENT * 65535).astype(np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(stored))
    np.testing.assert_allclose(load_grayscale(path)[0].numpy(), stored / 65535.0, rtol=0, atol=1e-7)
    assert validate_manifest(_one_row_manifest(tmp_path, "g16.png")) == []


def test_float_tiff_in_0_1_is_read_as_the_intensity_itself(tmp_path):
    path = _save(tmp_path, "f.tif", Image.fromarray(GRADIENT.astype(np.float32)))
    np.testing.assert_array_equal(load_grayscale(path)[0].numpy(), GRADIENT.astype(np.float32))
    assert validate_manifest(_one_row_manifest(tmp_path, "f.tif")) == []


@pytest.mark.parametrize("values, words", [
    (GRADIENT * 255, "float pixels span 0..255"),
    (GRADIENT * 2 - 1, "float pixels span -1..1"),
    (np.where(GRADIENT > 0.5, np.nan, GRADIENT), "NaN or infinity"),
])
def test_float_outside_0_1_is_refused_in_validation_and_loading(tmp_path, values, words):
    path = _save(tmp_path, "f.tif", Image.fromarray(values.astype(np.float32)))
    problems = validate_manifest(_one_row_manifest(tmp_path, "f.tif"))
    assert [(p.row, p.column) for p in problems] == [(1, "image")] and words in problems[0].message
    with pytest.raises(DataError, match=f"{path}: .*{words}"):
        load_grayscale(path)


def test_rgb_becomes_itu_601_luma(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    rgb[1, :] = (200, 100, 50)
    path = _save(tmp_path, "rgb.png", Image.fromarray(rgb))
    # ITU-R 601-2: L = R 299/1000 + G 587/1000 + B 114/1000 (Pillow rounds to the nearest integer)
    luma = np.round(rgb @ np.array([0.299, 0.587, 0.114])) / 255
    np.testing.assert_allclose(load_grayscale(path)[0].numpy(), luma, atol=1 / 255 + 1e-7)
    assert load_grayscale(path)[0, 0, 0] == pytest.approx(76 / 255)  # red: 255 * 0.299 = 76.2


def test_palette_is_looked_up_not_read_as_indices(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 10, 10, 250, 250, 250, 128, 128, 128] + [0] * (256 * 3 - 9))
    path = _save(tmp_path, "p.png", image)
    expected = np.array([[10, 250], [128, 250]], dtype=np.float32) / 255
    np.testing.assert_allclose(load_grayscale(path)[0].numpy(), expected, atol=1e-7)


def test_bilevel_is_0_or_1(tmp_path):
    path = _save(tmp_path, "b.png", Image.fromarray(np.array([[True, False]])))
    assert load_grayscale(path)[0].tolist() == [[1.0, 0.0]]


def test_32_bit_integer_outside_the_16_bit_range_is_refused(tmp_path):
    path = _save(tmp_path, "i.tif", Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    with pytest.raises(DataError, match="32-bit integer pixels span 0..70000"):
        load_grayscale(path)


def test_a_truncated_png_is_named_by_validation_and_loading(tmp_path):
    path = _save(tmp_path, "t.png", Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)))
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixel data cut
    problems = validate_manifest(_one_row_manifest(tmp_path, "t.png"))
    assert [(p.row, p.column) for p in problems] == [(1, "image")] and str(path) in problems[0].message
    with pytest.raises(DataError, match="t.png"):
        load_grayscale(path)
