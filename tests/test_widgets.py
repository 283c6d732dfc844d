"""The interactive generator without a browser: widget values → the pipeline's sampler → the image shown."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from busgen_lib.diffusion import pipeline
from busgen_lib.diffusion.checkpoint import load_model
from busgen_lib.diffusion.plan import Request
from busgen_lib.errors import DataError, UsageError
from busgen_lib.widgets import generate_image, generator, parse_box


@pytest.fixture(scope="module")
def model(smoke_model):
    return load_model(smoke_model)


def test_parse_box_reads_four_numbers_and_explains_anything_else():
    assert parse_box("0.1, 0.2 0.5,0.6") == (0.1, 0.2, 0.5, 0.6)
    with pytest.raises(UsageError, match="four numbers"):
        parse_box("0.1, 0.2, 0.5")
    with pytest.raises(UsageError, match="four numbers"):
        parse_box("0.1, a, 0.5, 0.6")


def test_generate_image_is_the_dataset_image_of_the_same_request(model, one_thread):
    device = model.config.device_names[1]
    image, seconds = generate_image(model, "benign", device, (0.2, 0.3, 0.6, 0.7), guidance=1.5, steps=3, seed=11)
    size = model.config.image_size
    assert image.shape == (size, size) and image.dtype == np.uint8 and seconds > 0
    again, _ = generate_image(model, "benign", device, (0.2, 0.3, 0.6, 0.7), guidance=1.5, steps=3, seed=11)
    np.testing.assert_array_equal(image, again)
    other, _ = generate_image(model, "benign", device, (0.2, 0.3, 0.6, 0.7), guidance=1.5, steps=3, seed=12)
    assert not np.array_equal(image, other)
    reference = pipeline.model_sample_fn(model, steps=3, guidance=1.5, sampler="dpmsolver++-singlestep", order=3)(
        [Request(0, 11, "benign", device, [(0.2, 0.3, 0.6, 0.7)])])[0]
    np.testing.assert_array_equal(image, reference)


def test_generate_image_refuses_bad_conditions(model):
    with pytest.raises(DataError, match="needs at least one lesion box"):
        generate_image(model, "malignant", model.config.device_names[0], None, 1.0, 2, 0)
    with pytest.raises(DataError, match="device: unknown"):
        generate_image(model, "normal", "no-such-device", None, 1.0, 2, 0)


def test_panel_button_shows_the_image_of_its_values_and_reports_bad_input(smoke_model, model, one_thread):
    panel = generator(smoke_model)
    panel.pathology.value, panel.device.value = "malignant", model.config.device_names[2]
    panel.box.value, panel.guidance.value, panel.steps.value, panel.seed.value = "0.1 0.1 0.5 0.5", 2.0, 3, 5
    panel.button.click()
    shown = np.asarray(Image.open(io.BytesIO(panel.image.value)))
    expected, _ = generate_image(model, "malignant", model.config.device_names[2], (0.1, 0.1, 0.5, 0.5), 2.0, 3, 5)
    np.testing.assert_array_equal(shown, expected)
    assert panel.status.value.startswith("malignant") and " s (3 steps" in panel.status.value
    panel.box.value = "0.5 0.5 0.1"
    assert panel.generate() is None and panel.status.value.startswith("not generated: box")
    panel.pathology.value = "normal"
    assert panel.box.disabled and panel.generate() is not None  # a normal image ignores the box
