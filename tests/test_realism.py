"""Realism and privacy measures against independent references: brute-force loops, a hand-computed 1-D case,
sklearn's cosine similarity, an MS-SSIM written out from its definition with scipy, and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d
from sklearn.metrics.pairwise import cosine_similarity
from torch import nn

from busgen_lib.errors import DataError
from busgen_lib.evaluate import realism
from busgen_lib.evaluate.memorisation import Neighbours


class PixelFeatures(nn.Module):
    """The flattened image as its own feature vector: cosine similarities a test can recompute with sklearn."""

    def __init__(self, size: int):
        super().__init__()
        self.num_features = size * size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- precision / recall

def _brute_force_pr(real: np.ndarray, generated: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        return [sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)[k - 1]
                for i, p in enumerate(points)]

    def inside(balls, r, queries):
        return np.mean([any(np.linalg.norm(q - b) <= rb for b, rb in zip(balls, r)) for q in queries])

    return inside(real, radii(real), generated), inside(generated, radii(generated), real)


def test_precision_recall_matches_a_brute_force_loop():
    rng = np.random.default_rng(1)
    real, generated = rng.normal(size=(14, 3)), rng.normal(0.7, 1.3, size=(11, 3))
    for k in (1, 3, 5):
        ours = realism.precision_recall(torch.from_numpy(real), torch.from_numpy(generated), k)
        assert ours == pytest.approx(_brute_force_pr(real, generated, k), abs=1e-12)


def test_row_blocks_give_the_same_balls_and_coverage():
    generator = torch.Generator().manual_seed(2)
    points, queries = torch.randn(23, 3, generator=generator).double(), torch.randn(17, 3, generator=generator).double()
    radii = realism._radii(points, 3)
    assert torch.equal(realism._radii(points, 3, batch_size=4), radii)
    assert realism._coverage(points, radii, queries, batch_size=5) == realism._coverage(points, radii, queries)


def test_precision_recall_hand_computed_1d_case():
    # k = 1: every real point 0..3 has radius 1; of the generated 0.5, 10, 4.5, 3.9 only 0.5 and 3.9 lie within
    # 1 of a real point (precision 2/4); the generated radii are 3.4, 5.5, 0.6, 0.6, and the ball of 0.5
    # (reaching 3.9) covers every real point (recall 1).
    real, generated = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[0.5], [10.0], [4.5], [3.9]])
    assert realism.precision_recall(real, generated, k=1) == pytest.approx((0.5, 1.0))


def test_precision_recall_of_identical_and_of_far_apart_sets():
    points = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    assert realism.precision_recall(points, points.clone(), k=3) == (1.0, 1.0)
    assert realism.precision_recall(points, points + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_needs_more_points_than_k():
    with pytest.raises(DataError, match="more than 3"):
        realism.precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


# --------------------------------------------------------------------------- cosine nearest neighbours

def test_feature_neighbours_match_sklearn_cosine_with_mirrors():
    training, generated = _images(9, seed=1), _images(7, seed=2)
    generated[3] = training[5].flip(-1)  # an exact mirrored copy
    found = realism.feature_neighbours(generated, training, PixelFeatures(16))
    bank = torch.cat((training, training.flip(-1))).flatten(1).double().numpy()
    sims = cosine_similarity(generated.flatten(1).double().numpy(), bank)
    np.testing.assert_allclose(found.similarity, sims.max(axis=1), atol=1e-12)
    np.testing.assert_array_equal(found.index, sims.argmax(axis=1) % 9)
    np.testing.assert_array_equal(found.flipped, sims.argmax(axis=1) >= 9)
    assert found.index[3] == 5 and found.flipped[3] and found.similarity[3] == pytest.approx(1.0)


def test_feature_novelty_threshold_is_the_closest_holdout_image():
    training, holdout = _images(8, seed=3), _images(5, seed=4)
    bank = torch.cat((training, training.flip(-1))).flatten(1).double().numpy()
    expected = cosine_similarity(holdout.flatten(1).double().numpy(), bank).max()
    assert realism.feature_novelty_threshold(training, holdout, PixelFeatures(16)) == pytest.approx(expected)


def test_neighbour_images_mirror_where_the_mirror_matched_and_closest_pairs_sort():
    training = _images(4, seed=5)
    found = Neighbours(similarity=np.array([0.2, 0.9, 0.5]), index=np.array([3, 1, 1]),
                       flipped=np.array([False, True, False]))
    pairs = realism.neighbour_images(training, found)
    assert torch.equal(pairs[0], training[3]) and torch.equal(pairs[1], training[1].flip(-1))
    assert torch.equal(pairs[2], training[1])
    np.testing.assert_array_equal(realism.closest_pairs(found, 2), [1, 2])


# --------------------------------------------------------------------------- MS-SSIM

def _window() -> np.ndarray:
    d = np.arange(realism.MSSSIM_WINDOW) - realism.MSSSIM_WINDOW // 2
    g = np.exp(-0.5 * (d / realism.MSSSIM_SIGMA) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def _reference_msssim(x: np.ndarray, y: np.ndarray, betas: tuple[float, ...]) -> float:
    """MS-SSIM written out (Wang et al. 2003, data range 2): contrast-structure at every scale but the last,
    full SSIM at the last, negative terms clipped at 0, 2x2 mean pooling between scales. As torchmetrics, the
    SSIM map covers the reflect-padded image and the contrast map only the window-valid interior."""
    w, half = _window(), realism.MSSSIM_WINDOW // 2
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    terms = []
    for scale in range(len(betas)):
        px, py = np.pad(x, half, mode="reflect"), np.pad(y, half, mode="reflect")
        mx, my = correlate2d(px, w, "valid"), correlate2d(py, w, "valid")
        vx = np.maximum(correlate2d(px * px, w, "valid") - mx ** 2, 0)
        vy = np.maximum(correlate2d(py * py, w, "valid") - my ** 2, 0)
        cxy = correlate2d(px * py, w, "valid") - mx * my
        cs = (2 * cxy + c2) / (vx + vy + c2)
        if scale == len(betas) - 1:
            terms.append(max(0.0, float(((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs).mean())))
        else:
            terms.append(max(0.0, float(cs[half:-half, half:-half].mean())))
            h = x.shape[0] // 2 * 2
            x = x[:h, :h].reshape(h // 2, 2, h // 2, 2).mean(axis=(1, 3))
            y = y[:h, :h].reshape(h // 2, 2, h // 2, 2).mean(axis=(1, 3))
    return float(np.prod(np.array(terms) ** np.array(betas)))


@pytest.mark.parametrize("size", [32, 64])
def test_msssim_matches_its_definition(size):
    base = _images(3, size, seed=6)
    other = (0.7 * base + 0.3 * _images(3, size, seed=7)).clamp(-1, 1)  # related, so no term is clipped to 0
    ours = realism.msssim(base, other)
    betas = realism.msssim_betas(size)
    expected = [_reference_msssim(b[0].double().numpy(), o[0].double().numpy(), betas) for b, o in zip(base, other)]
    np.testing.assert_allclose(ours, expected, rtol=1e-4)
    np.testing.assert_allclose(realism.msssim(base, base), 1.0, atol=1e-5)


def test_msssim_scales_fit_the_image_size():
    assert [len(realism.msssim_betas(s)) for s in (32, 64, 160, 256)] == [2, 3, 4, 5]
    assert sum(realism.msssim_betas(64)) == pytest.approx(1.0)
    assert realism.msssim_betas(64)[0] == pytest.approx(0.0448 / (0.0448 + 0.2856 + 0.3001))
    with pytest.raises(DataError, match="more than 10 px"):
        realism.msssim_betas(8)


# --------------------------------------------------------------------------- two-sample test

def test_grouped_folds_never_split_a_patient_and_keep_both_classes_in_each_fold():
    labels = np.r_[np.zeros(24, int), np.ones(20, int)]
    groups = [f"p{i // 3}" for i in range(24)] + [f"g{i}" for i in range(20)]
    folds = realism.grouped_folds(labels, groups, folds=4, seed=0)
    for g in set(groups):
        assert len({folds[i] for i, h in enumerate(groups) if h == g}) == 1
    for f in range(4):
        assert set(labels[folds == f]) == {0, 1}
    with pytest.raises(DataError, match="at least 9 patients"):
        realism.grouped_folds(labels, groups, folds=9)


def test_two_sample_test_separates_different_sets_and_not_identical_ones():
    real = _images(40, 16, seed=8) * 0.5 - 0.4
    brighter = _images(40, 16, seed=9) * 0.5 + 0.4
    same = _images(40, 16, seed=10) * 0.5 - 0.4
    groups = [f"p{i // 2}" for i in range(40)]  # two views per patient
    separable = realism.two_sample_test(real, brighter, groups, folds=2, epochs=3, n_boot=200)
    assert separable.auc > 0.95
    null = realism.two_sample_test(real, same, groups, folds=2, epochs=3, n_boot=200)
    assert null.ci[0] < 0.5 < null.ci[1]
    assert set(np.unique(null.folds)) == {0, 1} and null.labels.sum() == 40


# --------------------------------------------------------------------------- the table

def test_measure_realism_counts_exact_copies_and_none_among_holdout():
    training, holdout = _images(12, seed=11), _images(6, seed=12)
    copies = training[:5].flip(-1).clone()
    measured = realism.measure_realism({"copies": copies, "new": _images(5, seed=13)}, training, holdout,
                                       PixelFeatures(16), k=2)
    rows = measured.table.set_index("arm")
    assert rows.loc["copies", "copies"] == 5 and rows.loc["copies", "max_cosine"] == pytest.approx(1.0)
    assert rows.loc["copies", "max_msssim"] == pytest.approx(1.0, abs=1e-5)
    assert rows.loc["copies", "precision"] == 1.0
    assert rows.loc["real hold-out", "copies"] == 0
    assert rows.loc["real hold-out", "max_cosine"] == pytest.approx(measured.threshold)
    assert list(rows.index) == ["copies", "new", "real hold-out"]
    np.testing.assert_array_equal(measured.neighbours["copies"].index, range(5))
    assert measured.neighbours["copies"].flipped.all() and len(measured.msssim["new"]) == 5
