"""Does a device translation keep the content and take the style? Measured on the phantom (§4.3.2, notebook 02).

`evaluate_translation` checks that a translation keeps the content (SSIM to
its source; the lesion still segments where the source's true mask is) and
takes the style (a device classifier trained on real images names the target
device), and compares the translation with the same scene rendered by the
target device (`phantom_renderer`), which only a simulator can provide.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from busgen_lib.data.augment import prepare
from busgen_lib.data.dataset import load_images, load_masks
from busgen_lib.data.schema import parse_boxes
from busgen_lib.devices.translate import DeviceTranslators
from busgen_lib.evaluate.probes import Probe, Segmenter
from busgen_lib.evaluate.stats import bootstrap_ci, proportion_ci

# A function giving the same view re-imaged by another device: (manifest row, device) -> uint8 image (H, W).
TruthRenderer = Callable[[pd.Series, str], np.ndarray]


def phantom_renderer(seed: int, n_images: int, size: int) -> TruthRenderer:
    """Re-image a phantom row's exact scene with any device: the ground truth of a translation.

    `seed`, `n_images` and `size` must be those the phantom was written with
    (`write_phantom`), since the cohort is planned for exactly n images. The
    view is found by (exam_id, lesion_id, view) and rendered with its own
    random stream, as `writer.render_view` does, but with another device.
    """
    from busgen_lib.data.phantom.render import render_image
    from busgen_lib.data.phantom.scene import build_scene
    from busgen_lib.data.phantom.writer import iter_patients
    from busgen_lib.data.devices import get_device

    patients = {patient.patient_id: (index, patient) for index, patient in iter_patients(n_images, seed)}

    def render(row: pd.Series, device: str) -> np.ndarray:
        if row["patient_id"] not in patients:
            raise ValueError(f"patient {row['patient_id']!r} is not in the phantom of seed {seed} with "
                             f"{n_images} images; pass the seed and size it was written with")
        index, patient = patients[row["patient_id"]]
        for number, view in enumerate(patient.views):
            lesion = patient.lesions[view.target].lesion_id if view.target is not None else ""
            if (patient.exam_id(view.exam), lesion, view.index) == (row["exam_id"], row["lesion_id"], int(row["view"])):
                rng = np.random.default_rng([seed, index, 1 + number])
                scene, _ = build_scene(patient, view, size, rng)
                return render_image(scene, get_device(device), rng)
        raise ValueError(f"{row['image']}: no view of patient {row['patient_id']} matches "
                         f"exam {row['exam_id']}, lesion {row['lesion_id']!r}, view {row['view']}")

    return render


def _ssim(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-image SSIM of two (N, 1, S, S) batches in [-1, 1]."""
    # Imported here: torchmetrics' image package takes seconds to import and only this evaluation needs it.
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(x, y, data_range=2.0, reduction="none").numpy()


def _iou(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image IoU of (N, S, S) bool masks (true masks of lesion images are never empty)."""
    return (pred & true).sum(axis=(1, 2)) / np.maximum((pred | true).sum(axis=(1, 2)), 1)


def _mean_row(device: str, measure: str, values: np.ndarray, seed: int) -> dict:
    lo, hi = (bootstrap_ci(np.mean, values, seed=seed)[1:] if len(values) > 1 else (np.nan, np.nan))
    return {"device": device, "measure": measure, "value": float(np.mean(values)) if len(values) else np.nan,
            "ci_lo": lo, "ci_hi": hi, "n": len(values)}


def _rate_row(device: str, measure: str, hits: np.ndarray) -> dict:
    p, lo, hi = proportion_ci(int(hits.sum()), len(hits))
    return {"device": device, "measure": measure, "value": p, "ci_lo": lo, "ci_hi": hi, "n": len(hits)}


def evaluate_translation(translators: DeviceTranslators, df_test: pd.DataFrame, device_probe: Probe,
                         segmenter: Segmenter, *, truth: TruthRenderer | None = None,
                         max_sources: int | None = None, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Content preservation and style transfer per target device, in long form (device, measure, value, CI, n).

    For target d the sources are the test rows of the devices its translator
    learnt from (at most `max_sources`, drawn with `seed`). Measures:

    - content: SSIM(translation, source); lesion IoU of the segmenter's mask on
      the translation with the source's true mask, beside the same on the
      untranslated source (the segmenter's own level);
    - style: share of translations the device probe calls d (Wilson CI),
      beside the share of untranslated sources it calls d, chance (1 / number
      of probe classes) and its accuracy on real test images of d (ceiling);
    - with `truth` (the phantom, `phantom_renderer`): SSIM of the translation
      and of the source with the same scene truly imaged by d.

    The probes must have been trained on real images at the translators' size.
    Means carry percentile-bootstrap CIs, proportions Wilson CIs.
    """
    size = translators.image_size
    df_test, attrs = df_test.reset_index(drop=True), dict(df_test.attrs)
    df_test.attrs = attrs
    names = df_test["device"].astype(str)
    images = load_images(df_test, size, progress)
    lesion = np.array([len(parse_boxes(b)) > 0 for b in df_test["boxes"]])
    rng = np.random.default_rng(seed)
    rows = []
    for target in tqdm(translators.devices, desc="evaluate translators", disable=not progress):
        if target not in device_probe.classes:
            raise ValueError(f"the device probe does not know {target!r}; its classes are {list(device_probe.classes)}")
        label = device_probe.classes.index(target)
        chosen = np.flatnonzero(names.isin(translators.translators[target].source_devices).to_numpy())
        if max_sources is not None and len(chosen) > max_sources:
            chosen = np.sort(rng.choice(chosen, max_sources, replace=False))
        source = images[torch.from_numpy(chosen)]
        translated = translators.translate(source, target)
        rows.append(_mean_row(target, "content: SSIM(translation, source)", _ssim(translated, source), seed))
        with_lesion = chosen[lesion[chosen]]
        part = df_test.iloc[with_lesion]
        part.attrs = dict(df_test.attrs)
        masks = load_masks(part, size).numpy()
        in_lesion = torch.from_numpy(lesion[chosen])
        rows.append(_mean_row(target, "content: lesion IoU, translation",
                              _iou(segmenter.predict_mask(translated[in_lesion]), masks), seed))
        rows.append(_mean_row(target, "content: lesion IoU, source",
                              _iou(segmenter.predict_mask(source[in_lesion]), masks), seed))
        rows.append(_rate_row(target, "style: called target, translation", device_probe.predict(translated) == label))
        rows.append(_rate_row(target, "style: called target, source", device_probe.predict(source) == label))
        real = images[torch.from_numpy((names == target).to_numpy())]
        rows.append(_rate_row(target, "style: called target, real target images", device_probe.predict(real) == label))
        rows.append({"device": target, "measure": "style: chance", "value": 1 / len(device_probe.classes),
                     "ci_lo": np.nan, "ci_hi": np.nan, "n": np.nan})
        if truth is not None:
            rendered = torch.stack([
                prepare(torch.from_numpy(truth(df_test.iloc[i], target) / 255.0).float()[None],
                        torch.zeros(0, 4), size)[0] * 2 - 1
                for i in chosen])
            rows.append(_mean_row(target, "truth: SSIM(translation, target render)", _ssim(translated, rendered), seed))
            rows.append(_mean_row(target, "truth: SSIM(source, target render)", _ssim(source, rendered), seed))
    return pd.DataFrame(rows, columns=["device", "measure", "value", "ci_lo", "ci_hi", "n"])
