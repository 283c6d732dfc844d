"""The BUS phantom as a specification: speckle physics, BI-RADS lesion features,
device domain shift, learnable-but-not-trivial pathology, and a valid manifest."""

import fcntl
import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage, stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from busgen_lib.data.phantom import (
    EXTRA_COLUMNS, detect_envelope, homogeneous_envelope, iter_patients, simulate_iq, speckle_snr, write_phantom,
)
from busgen_lib.data.phantom import cohort
from busgen_lib.data.phantom.speckle import FWHM_PER_SIGMA, psf_sigmas
from busgen_lib.data.schema import BIRADS, COLUMNS, box_problem, parse_boxes
from busgen_lib.data.devices import DEVICES, device_names
from busgen_lib.profiles import get_profile

DEMO = get_profile("demo")
N_IMAGES = 1200
SEED = 11
RAYLEIGH_SNR = np.sqrt(np.pi / (4 - np.pi))   # 1.913


def _shared_dir(tmp_path_factory) -> Path:
    """This session's temp root, shared by all xdist workers of the session."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """One demo-resolution phantom shared by the statistical tests (rendered once per session)."""
    out = _shared_dir(tmp_path_factory) / f"phantom-{SEED}-{N_IMAGES}"
    out.mkdir(exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = out / "manifest.csv"
        if not manifest.exists():
            write_phantom(out, N_IMAGES, size=DEMO.phantom_size, seed=SEED, progress=False)
    return out, pd.read_csv(manifest, dtype=str, keep_default_na=False)


def _image(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / rel), dtype=float)


def _first_box_px(row, shape) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = parse_boxes(row.boxes)[0]
    h, w = shape
    return round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)


def _target_mask(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The mask component whose bounding box is the target's box."""
    labels, _ = ndimage.label(mask)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) == box:
            return labels == k
    raise AssertionError(f"no mask component has box {box}")


# ---------------------------------------------------------------- speckle physics

def _no_compounding_device():
    return next(d for d in DEVICES if d.compound_angles == 1)


def test_homogeneous_envelope_is_rayleigh_before_log_compression():
    device = _no_compounding_device()
    rng = np.random.default_rng(0)
    envelopes = [homogeneous_envelope(device, 128, rng) for _ in range(6)]
    assert speckle_snr(np.concatenate([e.ravel() for e in envelopes])) == pytest.approx(RAYLEIGH_SNR, abs=0.1)
    # Near-independent samples: stride of two PSF FWHMs in both directions.
    stride = int(np.ceil(2 * FWHM_PER_SIGMA * max(psf_sigmas(device, 128))))
    samples = np.concatenate([e[::stride, ::stride].ravel() for e in envelopes])
    assert len(samples) >= 500
    scale = np.sqrt(np.mean(samples**2) / 2)   # Rayleigh maximum likelihood
    assert stats.kstest(samples, stats.rayleigh(scale=scale).cdf).pvalue > 0.01


def test_spatial_compounding_raises_speckle_snr_above_rayleigh():
    device = next(d for d in DEVICES if d.compound_angles > 1)
    envelope = homogeneous_envelope(device, 128, np.random.default_rng(1))
    assert speckle_snr(envelope) > RAYLEIGH_SNR + 0.3


def test_sparse_scatterers_give_pre_rayleigh_speckle():
    device = _no_compounding_device()
    ones = np.ones((128, 128))
    iq = simulate_iq(ones, device, np.random.default_rng(2), density=np.full_like(ones, 0.03))
    assert speckle_snr(detect_envelope(iq)) < RAYLEIGH_SNR - 0.2


# ---------------------------------------------------------------- lesion features

def _lesion_measures(root: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per lesion image: mean inside the target mask, in a ring around it, and the
    posterior contrast (below the lesion minus laterally adjacent columns, same depth)."""
    rows = []
    for row in manifest[manifest.pathology != "normal"].itertuples():
        image = _image(root, row.image)
        box = _first_box_px(row, image.shape)
        mask = _target_mask(_image(root, row.mask) > 0, box)
        ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        top = y1 + max(2, h // 6)
        rows_below = slice(top, min(image.shape[0], top + max(4, h // 2)))
        below = image[rows_below, x0 + w // 4:x1 - w // 4]
        side = np.concatenate([image[rows_below, max(0, x0 - w // 2):x0].ravel(),
                               image[rows_below, x1:x1 + w // 2].ravel()])
        posterior = below.mean() - side.mean() if below.size and side.size else np.nan
        rows.append({"lesion_id": row.lesion_id, "pathology": row.pathology, "posterior": row.posterior,
                     "inside": image[mask].mean(), "ring": image[ring].mean(), "contrast": posterior})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def lesion_measures(phantom) -> pd.DataFrame:
    return _lesion_measures(*phantom)


def test_lesions_are_hypoechoic_relative_to_surrounding_tissue(lesion_measures):
    diff = lesion_measures.inside - lesion_measures.ring
    assert (diff < 0).mean() > 0.85
    assert stats.wilcoxon(diff, alternative="less").pvalue < 1e-6


def test_malignant_lesions_shadow_and_benign_lesions_enhance(lesion_measures):
    per_lesion = lesion_measures.dropna().groupby(["lesion_id", "pathology"]).contrast.mean().reset_index()
    benign = per_lesion[per_lesion.pathology == "benign"].contrast
    malignant = per_lesion[per_lesion.pathology == "malignant"].contrast
    assert benign.median() > 0 > malignant.median()
    assert stats.mannwhitneyu(benign, malignant, alternative="greater").pvalue < 0.01


def test_posterior_descriptor_is_measurable_along_depth(lesion_measures):
    contrast = lesion_measures.dropna().groupby("posterior").contrast.median()
    assert contrast["enhancement"] > contrast["none"] > contrast["shadowing"]
    assert contrast["enhancement"] > 5 and contrast["shadowing"] < -5


# ---------------------------------------------------------------- learnability

def _device_features(image: np.ndarray) -> np.ndarray:
    """Physics only: grey-level histogram, radial, axial and lateral power spectra, depth profile."""
    image = image / 255.0
    size = image.shape[0]
    hist = np.histogram(image, bins=32, range=(0, 1))[0] / image.size
    power = np.abs(np.fft.fftshift(np.fft.fft2(image - image.mean()))) ** 2
    yy, xx = np.indices(power.shape) - size // 2
    radius = np.hypot(yy, xx).astype(int).ravel()
    radial = np.bincount(radius, power.ravel())[1:size // 2] / np.bincount(radius)[1:size // 2]
    axial, lateral = power[size // 2 + 1:, size // 2], power[size // 2, size // 2 + 1:]
    depth = image.reshape(16, -1).mean(axis=1)
    return np.concatenate([hist, np.log(radial), np.log(axial + 1e-9), np.log(lateral + 1e-9), depth])


def test_device_is_recognisable_on_held_out_patients(phantom):
    root, manifest = phantom
    x = np.stack([_device_features(_image(root, p)) for p in manifest.image])
    y = manifest.device.to_numpy()
    train = (manifest.split == "train").to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(x[train], y[train])
    accuracy = (model.predict(x[~train]) == y[~train]).mean()
    assert accuracy > 0.5, f"device accuracy {accuracy:.2f} (chance {1 / len(DEVICES):.2f})"


def _lesion_crop(image: np.ndarray, row, size: int, crop: int = 16) -> np.ndarray:
    """The target lesion with context (half a box each side, a box below), resized to crop x crop,
    from the image downsampled to the training resolution `size`; plus box aspect and area."""
    small = Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    padded = Image.fromarray(np.pad(np.asarray(small, np.float32), size, mode="edge"))
    x0, y0, x1, y1 = parse_boxes(row.boxes)[0]
    w, h = x1 - x0, y1 - y0
    extent = [(v + 1.0) * size for v in (x0 - w / 2, y0 - h / 2, x1 + w / 2, y1 + h)]
    pixels = np.asarray(padded.transform((crop, crop), Image.EXTENT, extent, Image.BILINEAR)).ravel()
    return np.concatenate([pixels, [np.log(h / w), np.log(w * h)]])


@pytest.mark.slow
def test_benign_vs_malignant_is_learnable_but_not_trivial(phantom):
    """Out-of-fold AUC of a logistic model on lesion crops, folds by patient."""
    root, manifest = phantom
    lesions = manifest[manifest.pathology != "normal"]
    x = np.stack([_lesion_crop(_image(root, r.image), r, DEMO.image_size) for r in lesions.itertuples()])
    y = (lesions.pathology == "malignant").to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
    scores = cross_val_predict(model, x, y, groups=lesions.patient_id, cv=GroupKFold(5), method="predict_proba")
    auc = roc_auc_score(y, scores[:, 1])
    assert 0.75 < auc < 0.97, f"out-of-fold AUC {auc:.3f}"


# ---------------------------------------------------------------- cohort design

@pytest.fixture(scope="module")
def planned() -> pd.DataFrame:
    """A large cohort planned (not rendered): one row per view with its target's labels."""
    rows = []
    for _, patient in iter_patients(10_000, seed=3):
        for view in patient.views:
            lesion = None if view.target is None else patient.lesions[view.target]
            rows.append({"pathology": patient.pathology, "subtype": lesion.subtype if lesion else "",
                         "aln": lesion.aln_positive if lesion else None,
                         "size": lesion.semi_axes[0] if lesion else np.nan,
                         **(lesion.descriptors if lesion else {})})
    return pd.DataFrame(rows)


def test_pathology_and_subtype_mix(planned):
    share = planned.pathology.value_counts(normalize=True)
    assert share["normal"] == pytest.approx(0.25, abs=0.04)
    assert share["benign"] == pytest.approx(0.45, abs=0.04)
    assert share["malignant"] == pytest.approx(0.30, abs=0.04)
    subtype = planned.subtype.value_counts(normalize=True)
    assert subtype["dcis"] >= 0.05 and subtype["tnbc"] >= 0.05


def test_dcis_is_non_mass_with_microcalcifications(planned):
    dcis = planned[planned.subtype == "dcis"]
    assert (dcis["shape"] == "non-mass").all()
    assert (dcis.calcifications == "intraductal").mean() > 0.7


def test_tnbc_like_lesions_are_rounder_more_circumscribed_and_enhance_more_than_idc(planned):
    tnbc, idc = planned[planned.subtype == "tnbc"], planned[planned.subtype == "idc"]
    assert (tnbc["shape"] != "irregular").mean() > (idc["shape"] != "irregular").mean() + 0.2
    smooth = ["circumscribed", "microlobulated"]
    assert tnbc.margin.isin(smooth).mean() > idc.margin.isin(smooth).mean() + 0.2
    assert (tnbc.posterior == "enhancement").mean() > (idc.posterior == "enhancement").mean() + 0.2


def test_node_positive_cancers_are_larger_more_irregular_with_thicker_halo(planned):
    invasive = planned[planned.subtype.isin(["idc", "ilc", "tnbc"])]
    pos, neg = invasive[invasive.aln == True], invasive[invasive.aln == False]  # noqa: E712
    assert pos["size"].median() > 1.15 * neg["size"].median()
    assert pos.margin.isin(["spiculated", "angular"]).mean() > neg.margin.isin(["spiculated", "angular"]).mean()
    assert (pos.halo == "thick").mean() > (neg.halo == "thick").mean() + 0.1


def test_benign_and_malignant_features_overlap(planned):
    benign, malignant = planned[planned.pathology == "benign"], planned[planned.pathology == "malignant"]
    assert (benign["shape"] == "irregular").mean() > 0.1
    assert (malignant.margin == "circumscribed").mean() > 0.05
    assert (malignant.posterior == "enhancement").mean() > 0.1


def test_presentation_follows_the_stated_model_screening_lesions_smaller_and_less_malignant():
    """The logistic presentation model (cohort.py) is recovered by an independent MLE fit (statsmodels)."""
    import statsmodels.api as sm
    rows = [(p.pathology == "malignant", max(lesion.semi_axes[0] for lesion in p.lesions),
             p.presentation == "symptomatic") for _, p in iter_patients(25_000, seed=4) if p.lesions]
    malignant, size, symptomatic = (np.array(c, dtype=float) for c in zip(*rows))
    x = sm.add_constant(np.column_stack([malignant, size - cohort.SYMPTOMATIC_REFERENCE_SIZE]))
    fit = sm.Logit(symptomatic, x).fit(disp=0)
    expected = [cohort.SYMPTOMATIC_BASE_LOGIT, cohort.SYMPTOMATIC_MALIGNANT_SHIFT, cohort.SYMPTOMATIC_PER_SIZE]
    assert np.all(np.abs(fit.params - expected) < 4 * fit.bse), (fit.params, fit.bse)
    screening = symptomatic == 0
    assert np.median(size[screening]) < np.median(size[~screening])
    assert malignant[screening].mean() < malignant[~screening].mean() - 0.1
    assert 0.15 < malignant[screening].mean() < 0.5   # both classes present for the Fig 3e task


def test_presentation_is_one_value_per_patient(phantom):
    _, manifest = phantom
    assert set(manifest.presentation) == set(cohort.PRESENTATIONS)
    assert (manifest.groupby("patient_id").presentation.nunique() == 1).all()
    lesions = manifest[manifest.pathology != "normal"]
    assert set(lesions[lesions.presentation == "screening"].pathology) == {"benign", "malignant"}


# ---------------------------------------------------------------- manifest validity

def test_manifest_columns_and_vocabularies(phantom):
    root, manifest = phantom
    assert list(manifest.columns) == [*COLUMNS, *EXTRA_COLUMNS]
    assert len(manifest) == N_IMAGES and manifest.image.is_unique
    assert set(manifest.pathology) == {"normal", "benign", "malignant"}
    assert set(manifest.birads) <= set(BIRADS)
    assert ((manifest.birads == "1") == (manifest.pathology == "normal")).all()
    assert set(manifest.device) <= set(device_names())
    malignant = manifest.pathology == "malignant"
    assert set(manifest.aln_positive[malignant]) == {"0", "1"} and (manifest.aln_positive[~malignant] == "").all()
    assert all((root / p).is_file() for p in [*manifest.image, *manifest["mask"]])


def test_boxes_are_exactly_the_mask_components(phantom):
    root, manifest = phantom
    two_lesion_images = 0
    for row in manifest.itertuples():
        mask = _image(root, row.mask)
        assert set(np.unique(mask)) <= {0.0, 255.0}
        labels, _ = ndimage.label(mask > 0)
        h, w = mask.shape
        from_mask = sorted((s[1].start / w, s[0].start / h, s[1].stop / w, s[0].stop / h)
                           for s in ndimage.find_objects(labels))
        boxes = parse_boxes(row.boxes)
        assert [box_problem(b) for b in boxes] == [None] * len(boxes)
        assert np.allclose(sorted(boxes), from_mask, atol=1e-6) if boxes else not from_mask, row.image
        assert (len(boxes) == 0) == (row.pathology == "normal")
        two_lesion_images += len(boxes) > 1
        assert float(row.relative_area) == pytest.approx(sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes), abs=1e-5)
    assert two_lesion_images > 0


def test_ids_hierarchy_and_views(phantom):
    _, manifest = phantom
    assert manifest.patient_id.str.fullmatch(r"PH\d{5}").all()
    assert (manifest.groupby("patient_id").split.nunique() == 1).all()
    assert (manifest.groupby("exam_id").patient_id.nunique() == 1).all()
    assert (manifest.groupby("exam_id").device.nunique() == 1).all()
    assert manifest.groupby("patient_id").exam_id.nunique().between(1, 2).all()
    lesions = manifest[manifest.lesion_id != ""]
    assert (lesions.groupby("lesion_id").patient_id.nunique() == 1).all()
    assert lesions.groupby("patient_id").lesion_id.nunique().between(1, 2).all()
    views = lesions.groupby("lesion_id").view
    assert views.size().between(2, 8).all()
    assert views.nunique().equals(views.size())
    angles = lesions.groupby("lesion_id").probe_angle.nunique()
    assert (angles == views.size()).mean() > 0.95   # views are different probe poses
    assert (manifest[manifest.pathology == "normal"].lesion_id == "").all()
    assert (lesions.groupby("patient_id").exam_id.nunique() == 2).any()   # one lesion, two exams / devices


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _digest(write_phantom(tmp_path / "a", 25, size=64, seed=5, progress=False).parent)
    b = _digest(write_phantom(tmp_path / "b", 25, size=64, seed=5, progress=False).parent)
    c = _digest(write_phantom(tmp_path / "c", 25, size=64, seed=6, progress=False).parent)
    assert a == b
    assert a["manifest.csv"] != c["manifest.csv"]
    assert Counter(a.values()) != Counter(c.values())


@pytest.mark.parametrize("n", [1, 2, 7])
def test_writes_exactly_n_images(tmp_path, n):
    manifest = pd.read_csv(write_phantom(tmp_path, n, size=64, seed=n, progress=False), dtype=str, keep_default_na=False)
    assert len(manifest) == n == len(list((tmp_path / "images").iterdir()))


def test_renders_at_256_px(tmp_path):
    manifest = pd.read_csv(write_phantom(tmp_path, 4, size=256, seed=1, progress=False), dtype=str, keep_default_na=False)
    for row in manifest.itertuples():
        image = np.asarray(Image.open(tmp_path / row.image))
        assert image.shape == (256, 256) and image.dtype == np.uint8
        assert image.std() > 10   # speckle, not a blank frame
