"""CPSample guidance and the memorisation measures, checked against closed forms.

The guidance is driven by an analytic classifier, p(x) = σ(w·x + b) at every t,
for which ∇_x log(p(1 − p)) = (1 − 2p) w; the Fréchet distance against
scipy's matrix square root; the copy detector against hand-computed correlations.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from busgen_lib.data.manifest import read_manifest
from busgen_lib.diffusion.model import build_model, model_settings
from busgen_lib.diffusion.privacy import (NoiseAwareClassifier, classifier_accuracy, classifier_config,
                                          CPSampleGuidance, load_classifier, protect, random_labels, save_classifier,
                                          train_cpsample_classifier)
from busgen_lib.diffusion.sample import sample
from busgen_lib.errors import DataError, UsageError
from busgen_lib.diffusion.schedule import ddpm_scheduler
from busgen_lib.evaluate.memorisation import (ProbeFeatures, frechet_distance, ncc, near_copy_rate,
                                              nearest_neighbours, novelty_threshold)
from busgen_lib.experiments.memorisation import memorisation_study, memorisation_subset
from busgen_lib.evaluate.probes import SmallCNN
from busgen_lib.evaluate.stats import proportion_ci

from reference_schedule import BETA_END, BETA_START, T, Schedule


def alpha_bar(t: int) -> float:
    """ᾱ_t computed independently of diffusers."""
    return float(np.cumprod(1.0 - np.linspace(BETA_START, BETA_END, T, dtype=np.float64))[t])


ALPHAS_CUMPROD = ddpm_scheduler(Schedule()).alphas_cumprod


class Logistic(nn.Module):
    """p(label 1 | x_t) = σ(w·x + b), the same at every t."""

    def __init__(self, w: torch.Tensor, b: float = 0.0):
        super().__init__()
        self.w, self.b = nn.Parameter(w.float()), b
        self.config = SimpleNamespace(num_train_timesteps=T)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        return x_t.flatten(1) @ self.w + self.b


W = torch.tensor([1.0, -2.0, 0.5, 1.5])


pytestmark = pytest.mark.usefixtures("one_thread")


def images_with_logits(logits: list[float]) -> torch.Tensor:
    """2×2 images x = z w / ‖w‖², whose logit under Logistic(W) is exactly z."""
    z = torch.tensor(logits)[:, None]
    return (z * W / W.dot(W)).view(-1, 1, 2, 2)


# --------------------------------------------------------------------------- guidance

def test_guidance_is_the_closed_form_push_for_confident_samples_and_exactly_zero_otherwise():
    logits = [9.0, -8.0, 1.0, -0.3, 4.0]  # p = 0.99988, 0.00034 (confident at α = 0.01), 0.73, 0.43, 0.982
    x = images_with_logits(logits)
    s, t = 3.0, 200
    delta = CPSampleGuidance(Logistic(W), ALPHAS_CUMPROD, alpha=0.01, scale=s)(x, torch.tensor(t), torch.zeros_like(x))
    p = torch.sigmoid(torch.tensor(logits, dtype=torch.float64))
    closed = -s * np.sqrt(1 - alpha_bar(t)) * (1 - 2 * p)[:, None] * W.double()
    torch.testing.assert_close(delta[:2].flatten(1).double(), closed[:2], rtol=1e-5, atol=0)
    assert torch.equal(delta[2:], torch.zeros_like(delta[2:]))


def test_guidance_gradient_matches_finite_differences_of_log_p_times_one_minus_p():
    x = images_with_logits([6.5, -7.5]).double()

    def objective(v: torch.Tensor) -> torch.Tensor:  # log(p(1 − p)) in float64, by hand
        p = torch.sigmoid(v.flatten(1) @ W.double())
        return torch.log(p * (1 - p))

    h, fd = 1e-5, torch.zeros(2, 4, dtype=torch.float64)
    for k in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[k] = h
        fd[:, k] = (objective(x + e.view(1, 1, 2, 2)) - objective(x - e.view(1, 1, 2, 2))) / (2 * h)
    s, t = 2.0, 50
    delta = CPSampleGuidance(Logistic(W), ALPHAS_CUMPROD, alpha=0.01, scale=s)(x.float(), t, torch.zeros(2, 1, 2, 2))
    grad = -delta.flatten(1).double() / (s * np.sqrt(1 - alpha_bar(t)))
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=1e-6)


def test_guided_x0_prediction_moves_toward_one_half():
    """As every solver uses it: x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ. The push lowers a confident-1 logit, raises a confident-0 one."""
    x = images_with_logits([7.0, -7.0, 0.5])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    classifier = Logistic(W)
    t = 120
    ab = alpha_bar(t)
    delta = CPSampleGuidance(classifier, ALPHAS_CUMPROD, alpha=1e-3, scale=5.0)(x, t, eps)

    def x0_logit(e: torch.Tensor) -> torch.Tensor:
        return classifier((x - np.sqrt(1 - ab) * e) / np.sqrt(ab), t).detach()

    moved = x0_logit(eps + delta) - x0_logit(eps)
    assert moved[0] < 0 < moved[1]
    assert moved[2] == 0
    # The size is closed-form too: Δz = s (1 − ᾱ)/√ᾱ · (1 − 2p) ‖w‖².
    p = torch.sigmoid(torch.tensor([7.0, -7.0]))
    torch.testing.assert_close(moved[:2], 5.0 * (1 - ab) / np.sqrt(ab) * (1 - 2 * p) * W.dot(W), rtol=1e-4, atol=0)


@pytest.mark.parametrize(("s1", "t1", "s2", "t2"), [(1.0, 10, 1.0, 400), (2.5, 250, 1000.0, 250), (7.0, 0, 0.5, 499)])
def test_push_scales_exactly_with_s_and_sqrt_one_minus_alpha_bar(s1, t1, s2, t2):
    x = images_with_logits([8.0, -9.0])
    d1 = CPSampleGuidance(Logistic(W), ALPHAS_CUMPROD, alpha=0.01, scale=s1)(x, t1, torch.zeros_like(x))
    d2 = CPSampleGuidance(Logistic(W), ALPHAS_CUMPROD, alpha=0.01, scale=s2)(x, t2, torch.zeros_like(x))
    # ᾱ as the solvers hold it (float32; its agreement with the float64 product is test_samplers' business):
    # at t = 0, 1 − ᾱ = β_0 = 1e-4 keeps only ~4 significant digits in float32.
    ab1, ab2 = float(ALPHAS_CUMPROD[t1]), float(ALPHAS_CUMPROD[t2])
    ratio = s1 * np.sqrt(1 - ab1) / (s2 * np.sqrt(1 - ab2))
    torch.testing.assert_close(d1.double(), ratio * d2.double(), rtol=1e-5, atol=0)


def test_gate_is_strict_at_alpha():
    alpha = 0.02
    z = float(np.log((1 - alpha) / alpha))  # p = 1 − α exactly at this logit
    x = images_with_logits([z - 0.01, z + 0.01, -z + 0.01, -z - 0.01])
    guidance = CPSampleGuidance(Logistic(W), ALPHAS_CUMPROD, alpha=alpha, scale=1.0)
    delta = guidance(x, 30, torch.zeros_like(x))
    pushed = delta.flatten(1).abs().sum(1) > 0
    assert pushed.tolist() == [False, True, False, True]
    assert (guidance.evaluated, guidance.fired, guidance.fire_rate) == (4, 2, 0.5)


def test_cond_fn_refuses_a_classifier_of_another_schedule():
    with pytest.raises(ValueError, match="T = 500"):
        CPSampleGuidance(Logistic(W), ALPHAS_CUMPROD[:100])


# --------------------------------------------------------------------------- guidance inside the sampler

class GaussianEps(nn.Module):
    """The exact ε-predictor of x_0 ~ N(μ, σ² I) on 2×2 images: E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱσ² + 1 − ᾱ)."""

    def __init__(self, mean: torch.Tensor, std: float):
        super().__init__()
        self.config = Schedule()
        self.mean, self.var = mean.view(1, 1, 2, 2), std ** 2
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a dtype

    def forward(self, x_t, t, pathology, device=None, boxes=None, box_valid=None, box_mask=None, force_drop=None):
        ab = ALPHAS_CUMPROD[int(torch.as_tensor(t).reshape(-1)[0])].double()
        eps = (1 - ab).sqrt() * (x_t.double() - ab.sqrt() * self.mean) / (ab * self.var + 1 - ab)
        return eps.to(x_t.dtype)


def test_cpsample_in_the_sampler_pulls_confident_samples_toward_one_half():
    """Data that the classifier is sure about (p ≈ 1 − 4e-5) ends closer to p = ½ with CPSample, same seeds."""
    model = GaussianEps(images_with_logits([10.0])[0], std=0.3)  # logits of the data: N(10, 0.82²)
    classifier = Logistic(W)
    cond = {"pathology": torch.ones(16, dtype=torch.long), "device": torch.zeros(16, dtype=torch.long)}
    kwargs = dict(sampler="dpmsolver++", steps=20, order=2, guidance=0.0, seeds=range(16), clip_x0=False,
                  progress=False)
    plain = classifier(sample(model, cond, **kwargs), 0).detach()
    pushed = classifier(sample(model, cond, cond_fn=CPSampleGuidance(classifier, ALPHAS_CUMPROD, alpha=1e-3,
                                                                     scale=2.0), **kwargs), 0).detach()
    assert plain.min() > np.log(1e3)  # without guidance every sample is "confident"
    assert torch.all(pushed < plain - 0.5)
    gated = sample(model, cond, cond_fn=CPSampleGuidance(classifier, ALPHAS_CUMPROD, alpha=1e-12), **kwargs)
    assert torch.equal(classifier(gated, 0).detach(), plain)  # never confident enough → the exact same samples


def test_sample_with_cpsample_runs_end_to_end_on_a_tiny_unet():
    torch.manual_seed(0)
    model = build_model("smoke", ("dev-a", "dev-b"), block_out_channels=(8, 16), norm_num_groups=4)
    classifier = NoiseAwareClassifier(**classifier_config(model.config, 32, widths=(8, 16), norm_num_groups=4))
    cond = {"pathology": torch.tensor([1, 2, 3]), "device": torch.tensor([0, 1, 2])}
    kwargs = dict(steps=3, seeds=[0, 1, 2], progress=False)
    plain = sample(model, cond, **kwargs)
    # α = ½ pushes every sample that is not exactly at p = ½, so the untrained classifier has an effect.
    pushed = sample(model, cond, cond_fn=CPSampleGuidance(classifier, ddpm_scheduler(model.config).alphas_cumprod,
                                                          alpha=0.5, scale=50.0), **kwargs)
    assert pushed.shape == (3, 1, 32, 32) and torch.isfinite(pushed).all()
    assert not torch.equal(pushed, plain)
    assert all(p.grad is None for p in classifier.parameters())


# --------------------------------------------------------------------------- the classifier

def test_classifier_overfits_random_labels_and_knows_nothing_beyond_them(tmp_path):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(16, 1, 16, 16, generator=gen) * 2 - 1
    schedule = Schedule(image_size=16)
    fit = train_cpsample_classifier(images, schedule, steps=250, batch_size=16, widths=(16, 32), seed=3,
                                    progress=False)
    assert fit.labels.tolist() == random_labels(16, 3).tolist() and fit.labels.sum() == 8
    assert fit.clean_accuracy >= 0.95
    torch.manual_seed(3)
    fresh = NoiseAwareClassifier.from_config(fit.classifier.config)
    assert abs(classifier_accuracy(fresh, images, fit.labels) - 0.5) <= 0.25
    new_images, new_labels = torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1, random_labels(64, 9)
    assert abs(classifier_accuracy(fit.classifier, new_images, new_labels) - 0.5) <= 0.15
    # Noise destroys what it memorised: at t = T − 1 nothing is left to tell the images apart.
    assert fit.noised_accuracy < fit.clean_accuracy

    loaded = load_classifier(save_classifier(fit.classifier, tmp_path / "cpsample"))
    assert model_settings(loaded) == model_settings(fit.classifier)
    torch.testing.assert_close(loaded(images, 7), fit.classifier(images, 7), rtol=0, atol=0)


def test_classifier_training_is_deterministic_per_seed():
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = [train_cpsample_classifier(images, Schedule(image_size=8), steps=5, batch_size=4, widths=(8, 8),
                                      seed=s, progress=False).classifier.state_dict() for s in (1, 1, 2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_protect_trains_once_then_reloads_the_same_classifier(tmp_path):
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = protect(images, Schedule(image_size=8), tmp_path / "c", steps=5, seed=1, progress=False)
    again = protect(images, Schedule(image_size=8), tmp_path / "c", steps=5, seed=1, progress=False)
    assert first.seconds > 0 and again.seconds == 0
    assert all(torch.equal(v, again.classifier.state_dict()[k]) for k, v in first.classifier.state_dict().items())
    assert torch.equal(first.labels, again.labels)
    assert (first.clean_accuracy, first.noised_accuracy) == (again.clean_accuracy, again.noised_accuracy)
    with pytest.raises(DataError, match="not 16 px"):
        protect(torch.zeros(8, 1, 16, 16), Schedule(image_size=16), tmp_path / "c", progress=False)


@pytest.mark.parametrize("change, named", [
    ({"images": "other"}, "trained for other protected images"),
    ({"images": "fewer"}, "protected images, number of images"),
    ({"steps": 6}, "--steps (stored 5, given 6)"),
    ({"seed": 2}, "--seed (stored 1, given 2)"),
])
def test_protect_refuses_a_classifier_trained_for_another_set_or_steps(tmp_path, change, named):
    """Issue 16: a reloaded classifier must be the one of these images, steps and seed, else its accuracies
    describe another set; the refusal names the difference and the manifest it was trained on."""
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    protect(images, Schedule(image_size=8), tmp_path / "c", steps=5, seed=1, progress=False, source="train.csv")
    given = {"images": images, "steps": 5, "seed": 1}
    if change.get("images") == "other":
        given["images"] = images.flip(0)  # the same pixels in another order are another labelled set
    elif change.get("images") == "fewer":
        given["images"] = images[:6]
    given.update({k: v for k, v in change.items() if k != "images"})
    with pytest.raises(DataError) as err:
        protect(given.pop("images"), Schedule(image_size=8), tmp_path / "c", progress=False, **given)
    assert named in str(err.value) and "(trained on train.csv)" in str(err.value)


def test_protect_refuses_zero_steps_and_an_empty_set(tmp_path):
    with pytest.raises(UsageError, match="--steps must be at least 1, got 0"):
        protect(torch.zeros(4, 1, 8, 8), Schedule(image_size=8), tmp_path / "c", steps=0, progress=False)
    with pytest.raises(DataError, match="no training images to protect"):
        protect(torch.zeros(0, 1, 8, 8), Schedule(image_size=8), tmp_path / "c", progress=False)


# --------------------------------------------------------------------------- nearest neighbours and copies

def test_ncc_of_known_vectors_is_the_pearson_correlation():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[1.0, 3.0, 2.0, 4.0], [4.0, 3.0, 2.0, 1.0], [10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(ncc(a, b), torch.tensor([[0.8, -1.0, 1.0]], dtype=torch.float64))


def smooth_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Low-frequency random images (upsampled 4×4 noise): structured, unlike white noise."""
    coarse = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def test_near_copy_rate_finds_copies_and_not_noise():
    training = smooth_images(10, 0)
    noise = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    generated = torch.cat((training[3:4], training[5:6].flip(-1), 0.5 * training[7:8] + 0.2, noise))
    nn_ = nearest_neighbours(generated, training)
    assert nn_.index[:3].tolist() == [3, 5, 7] and nn_.flipped[:3].tolist() == [False, True, False]
    np.testing.assert_allclose(nn_.similarity[:3], 1.0, atol=1e-12)
    assert nn_.similarity[3:].max() < 0.5
    rate = near_copy_rate(generated, training, threshold=0.9)
    assert (rate.copies, rate.n) == (3, 6)
    assert (rate.rate, *rate.ci) == proportion_ci(3, 6)
    assert near_copy_rate(generated, training, threshold=0.9, flips=False).copies == 2


def test_novelty_threshold_is_the_closest_holdout_match():
    training, holdout = smooth_images(6, 0), smooth_images(4, 2)
    assert novelty_threshold(training, holdout) == pytest.approx(
        float(ncc(holdout, torch.cat((training, training.flip(-1)))).max()))


# --------------------------------------------------------------------------- Fréchet distance

class Identity(nn.Module):
    """Features = the input row itself."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double().flatten(1)


def test_frechet_distance_matches_the_closed_form_on_gaussian_features():
    rng = np.random.default_rng(0)
    a = rng.multivariate_normal([0.0, 1.0, -1.0], [[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 2.0]], 500)
    b = rng.multivariate_normal([0.5, 0.5, -1.0], [[0.6, -0.2, 0.0], [-0.2, 1.2, 0.0], [0.0, 0.0, 1.0]], 300)
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a.T), np.cov(b.T)
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    value = frechet_distance(torch.from_numpy(a), torch.from_numpy(b), Identity(3))
    assert value == pytest.approx(closed, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a), Identity(3)) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_in_probe_features_is_zero_for_identical_sets_and_grows_with_a_shift():
    torch.manual_seed(0)
    features = ProbeFeatures(SmallCNN(3, width=8, depth=3))
    images = smooth_images(40, 5)
    same = frechet_distance(images, images.clone(), features)
    shifted = frechet_distance(images, (images + 0.5).clamp(-1, 1), features)
    assert abs(same) < 1e-4 * shifted and shifted > 0


# --------------------------------------------------------------------------- the memorising setting

def test_memorisation_subset_takes_one_image_per_lesion_and_holds_out_other_patients(tiny_phantom, tmp_path):
    df = read_manifest(memorisation_subset(tiny_phantom, tmp_path, n_train=6, n_holdout=3, seed=1))
    train, holdout = df[df["split"] == "train"], df[df["split"] == "test"]
    assert (len(train), len(holdout)) == (6, 3)
    key = df["lesion_id"].where(df["lesion_id"] != "", df["exam_id"])
    assert not key.duplicated().any()
    assert not set(train["patient_id"]) & set(holdout["patient_id"])


def test_memorisation_study_returns_one_row_per_arm(tiny_phantom, tmp_path):
    table, fit = memorisation_study(tiny_phantom, "smoke", tmp_path, n_train=4, n_holdout=2, n_generate=3,
                                    train_steps=2, train_overrides={"batch_size": 4}, classifier_steps=2,
                                    classifier_views=2, cpsample=[(0.5, 10.0)], sample_steps=2,
                                    feature_epochs=1, progress=False)
    assert table["arm"].tolist() == ["plain", "CPSample α=0.5 s=10", "real hold-out"]
    assert table["n"].tolist() == [3, 3, 2]
    assert table.loc[2, "near_copies"] == 0  # the threshold is the hold-out's own maximum
    assert np.isfinite(table[["mean_nn_similarity", "frechet_distance"]].to_numpy()).all()
    assert len(fit.labels) == 8  # 4 images × 2 views, one bit per image
    assert torch.equal(fit.labels[:4], fit.labels[4:])
