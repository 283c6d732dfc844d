"""The box prior reproduces the training boxes, only places boxes inside the image, and round-trips through JSON."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp

from busgen_lib.data.schema import box_problem, format_boxes, parse_boxes
from busgen_lib.diffusion.box_prior import BoxPrior, boxes_to_features, features_to_boxes


def synthetic_boxes(n: int, rng: np.random.Generator, cx_mean: float = 0.5, log_area_mean: float = -3.2) -> list:
    """In-image boxes with known centre, aspect and area distributions."""
    features = np.column_stack([
        rng.normal(cx_mean, 0.08, 3 * n), rng.normal(0.45, 0.06, 3 * n),
        rng.normal(0.3, 0.2, 3 * n), rng.normal(log_area_mean, 0.4, 3 * n),
    ])
    boxes = [tuple(b) for b in features_to_boxes(features).tolist() if box_problem(tuple(b)) is None]
    return boxes[:n]


def synthetic_manifest(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Benign images with one or two boxes, malignant with one, some normal rows and a flagged row."""
    rng = np.random.default_rng(seed)
    benign, malignant = synthetic_boxes(n, rng), synthetic_boxes(n // 2, rng, cx_mean=0.4, log_area_mean=-2.5)
    rows = [("benign", [benign[i], benign[i + 1]] if i % 3 == 0 else [benign[i]]) for i in range(0, n - 1, 2)]
    rows += [("malignant", [box]) for box in malignant]
    rows += [("normal", [])] * 50
    df = pd.DataFrame({"pathology": [p for p, _ in rows], "boxes": [format_boxes(b) for _, b in rows]})
    df["boxes_missing"] = ""
    return pd.concat([df, pd.DataFrame({"pathology": ["benign"], "boxes": ["[]"], "boxes_missing": ["1"]})])


def training_features(df: pd.DataFrame, pathology: str) -> np.ndarray:
    return boxes_to_features([b for text in df[df.pathology == pathology].boxes for b in parse_boxes(text)])


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return synthetic_manifest()


@pytest.fixture(scope="module")
def prior(manifest) -> BoxPrior:
    return BoxPrior.fit(manifest)


def flat(samples: list[list[tuple]]) -> list[tuple]:
    return [box for boxes in samples for box in boxes]


def test_features_and_boxes_are_inverse():
    boxes = np.array([[0.1, 0.2, 0.4, 0.3], [0.5, 0.5, 0.6, 0.9]])
    np.testing.assert_allclose(features_to_boxes(boxes_to_features(boxes)), boxes)


@pytest.mark.parametrize("pathology", ["benign", "malignant"])
def test_samples_follow_the_training_distribution(manifest, prior, pathology):
    sampled = boxes_to_features(flat(prior.sample(pathology, 2000, np.random.default_rng(1))))
    trained = training_features(manifest, pathology)
    for column, name in ((0, "centre x"), (3, "log area")):
        assert ks_2samp(sampled[:, column], trained[:, column]).pvalue > 0.01, name


def test_a_clearly_different_distribution_is_rejected(prior):
    shifted = boxes_to_features(synthetic_boxes(600, np.random.default_rng(2), cx_mean=0.62, log_area_mean=-2.6))
    sampled = boxes_to_features(flat(prior.sample("benign", 2000, np.random.default_rng(1))))
    assert ks_2samp(sampled[:, 0], shifted[:, 0]).pvalue < 1e-6
    assert ks_2samp(sampled[:, 3], shifted[:, 3]).pvalue < 1e-6


def test_boxes_per_image_follow_the_training_counts(prior):
    counts = np.array([len(boxes) for boxes in prior.sample("benign", 3000, np.random.default_rng(3))])
    assert set(counts) == {1, 2}
    assert abs((counts == 2).mean() - 1 / 3) < 0.04  # every third benign training image has two boxes


def test_all_sampled_boxes_are_valid(prior):
    for pathology in ("benign", "malignant"):
        boxes = flat(prior.sample(pathology, 2000, np.random.default_rng(4)))
        assert boxes and all(box_problem(box) is None for box in boxes)


def test_boxes_near_the_edge_are_redrawn_not_clipped():
    edge = pd.DataFrame({"pathology": ["benign"] * 40,
                         "boxes": [format_boxes([[0.0, 0.0, 0.3 + i / 400, 0.3]]) for i in range(40)]})
    boxes = flat(BoxPrior.fit(edge).sample("benign", 500, np.random.default_rng(5)))
    assert len(boxes) == 500 and all(box_problem(box) is None for box in boxes)


def test_a_prior_that_cannot_fit_inside_the_image_fails_clearly():
    huge = pd.DataFrame({"pathology": ["benign"] * 3, "boxes": [format_boxes([[0.0, 0.0, 1.0, 1.0]])] * 3})
    with pytest.raises(RuntimeError, match="relative"):
        BoxPrior.fit(huge).sample("benign", 10, np.random.default_rng(0))


def test_normal_images_get_no_boxes(prior):
    assert prior.sample("normal", 3, np.random.default_rng(0)) == [[], [], []]


def test_unknown_pathology_is_a_clear_error(prior):
    with pytest.raises(ValueError, match="unknown pathology 'cyst'.*normal, benign, malignant"):
        prior.sample("cyst", 1, np.random.default_rng(0))


def test_pathology_without_training_boxes_is_a_clear_error(manifest):
    only_benign = BoxPrior.fit(manifest[manifest.pathology != "malignant"])
    assert only_benign.pathologies == ("benign",)
    with pytest.raises(ValueError, match="no malignant boxes"):
        only_benign.sample("malignant", 1, np.random.default_rng(0))


def test_fitting_without_any_boxes_is_a_clear_error():
    with pytest.raises(ValueError, match="no lesion boxes"):
        BoxPrior.fit(pd.DataFrame({"pathology": ["normal"], "boxes": ["[]"]}))


def test_save_load_round_trip_gives_identical_samples(prior, tmp_path):
    loaded = BoxPrior.load(prior.save(tmp_path / "box_prior.json"))
    for pathology in ("benign", "malignant"):
        assert (loaded.sample(pathology, 200, np.random.default_rng(9))
                == prior.sample(pathology, 200, np.random.default_rng(9)))


def test_load_rejects_a_file_that_is_not_a_prior(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="other.json: not a box prior"):
        BoxPrior.load(path)
