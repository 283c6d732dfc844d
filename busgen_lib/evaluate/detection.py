"""Lesion-detection metrics of Fig 3a–c (§2.3, §4.4.1): AP at IoU 0.5, AP_small, bootstrap CIs and P-values.

"Small" lesions are the smallest 30% of the *training* lesions by area relative
to the image (the paper's threshold: 0.068). COCO's own "small" is a fixed
pixel area (< 32² px), which means nothing across image sizes, so AP_small here
is COCO's area-range AP with the range [0, threshold] in relative-area units:

- a ground-truth lesion with relative area > threshold is *ignored*: missing it
  costs nothing, and a detection matched to it (IoU ≥ 0.5, matched to it only
  when no small lesion matches) is neither a true nor a false positive;
- an unmatched detection counts as a false positive only if its own relative
  area is ≤ threshold; larger unmatched detections are ignored (COCO semantics);
- images without lesions stay in the test set, as in the paper (its test set
  mixes both), so detections on them are false positives (for AP_small: those
  of small area).

The paper's AP_small n (16,896 = 4,822 images with small lesions + 12,074
without lesions) suggests it kept only those images; here images whose
lesions are all large stay in, contributing only their small unmatched
detections. Rows flagged `boxes_missing` (a lesion without a box) are left out
of both metrics: their lesion cannot be scored.

Point estimates come from torchmetrics' `MeanAveragePrecision` (faster_coco_eval
backend). Its area ranges are fixed at COCO's pixel areas, so boxes are handed to
it in units where the image is `sqrt(32² / threshold)` wide: IoU does not change
with scale, and "area < 32²" then means "relative area < threshold".

The bootstrap (§4.5: 1,000 replications, images resampled) re-uses each
image's detection matches, which do not depend on the other images, and
repeats only COCO's accumulation step with image weights; this is hand-written
because re-running COCOeval per replicate costs ~60 ms per 300 images, i.e.
minutes per CI. tests/test_detector.py checks it against torchmetrics and
faster_coco_eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from busgen_lib.data.manifest import is_flagged
from busgen_lib.data.schema import BOXES_MISSING, box_problem, parse_boxes
from busgen_lib.errors import DataError, UsageError

IOU_THRESHOLD = 0.5          # AP50, the paper's Fig 3b–c
MAX_DETECTIONS = 100         # COCO's maxDets: detections scored per image
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolated precision
COCO_SMALL_AREA = 32.0 ** 2  # torchmetrics' fixed "small" upper bound (px²)

Prediction = dict[str, np.ndarray]  # {"boxes": (N, 4) relative xyxy, "scores": (N,)}


class _Predicts(Protocol):
    def predict(self, df: pd.DataFrame) -> list[Prediction]: ...


# --------------------------------------------------------------------------- ground truth

def lesion_boxes(df: pd.DataFrame) -> list[np.ndarray]:
    """Each row's lesion boxes as an (N, 4) array of relative [x0, y0, x1, y1]; refuses bad boxes by row."""
    if "boxes" not in df.columns:
        raise DataError("the manifest has no 'boxes' column: detection needs each image's lesion boxes "
                        "(a JSON list of relative [x0, y0, x1, y1]; [] for an image without lesions)")
    out = []
    for i, text in enumerate(df["boxes"]):
        where = f"row {i + 1} ({df['image'].iloc[i]})" if "image" in df.columns else f"row {i + 1}"
        try:
            boxes = parse_boxes(text)
        except ValueError as err:
            raise DataError(f"{where}, column boxes: {err}") from None
        for box in boxes:
            if (problem := box_problem(box)) is not None:
                raise DataError(f"{where}, column boxes: {problem}; boxes are relative to the image (0..1)")
        out.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return out


def scorable_rows(df: pd.DataFrame) -> np.ndarray:
    """Positions of rows usable for detection: all but those flagged `boxes_missing` (lesion without a box)."""
    if BOXES_MISSING not in df.columns:
        return np.arange(len(df))
    return np.flatnonzero(~is_flagged(df[BOXES_MISSING]).to_numpy())


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of (N, 4) xyxy boxes (relative boxes give areas relative to the image)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def small_area_threshold(train_df: pd.DataFrame, quantile: float = 0.3) -> float:
    """The relative lesion area below which the smallest `quantile` of training lesions fall (Fig 3a: 0.068)."""
    if not 0.0 < quantile < 1.0:
        raise UsageError(f"quantile must lie strictly between 0 and 1, got {quantile}")
    rows = scorable_rows(train_df)
    areas = _concat([box_areas(b) for b in lesion_boxes(train_df.iloc[rows])], float)
    if len(areas) == 0:
        raise DataError("the training manifest has no lesion boxes, so there is no lesion-size distribution "
                        "to take the small-lesion threshold from")
    return float(np.quantile(areas, quantile))


# --------------------------------------------------------------------------- point estimates (torchmetrics)

def _check_predictions(predictions: list[Prediction], n: int) -> None:
    if len(predictions) != n:
        raise UsageError(f"{len(predictions)} predictions for {n} test images: predict on the same manifest")
    for i, p in enumerate(predictions):
        if np.size(p["boxes"]) != 4 * len(p["scores"]):
            raise UsageError(f"prediction {i}: boxes must be (N, 4) for N scores, got {np.shape(p['boxes'])} "
                             f"for {len(p['scores'])} scores")


def average_precision(predictions: list[Prediction], targets: list[np.ndarray], small_threshold: float
                      ) -> tuple[float, float]:
    """(AP50, AP50_small) by torchmetrics/faster_coco_eval; nan where there is no (small) lesion to find."""
    scale = math.sqrt(COCO_SMALL_AREA / small_threshold)  # relative area < threshold  <=>  scaled area < 32²

    def tensor(a: np.ndarray, width: int) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1, width) * scale, dtype=torch.float64)

    # torchmetrics' default recall points come from a float32 linspace, which shifts AP whenever a recall
    # lands on k/100; COCO's float64 points make it agree with COCOeval.
    metric = MeanAveragePrecision(iou_thresholds=[IOU_THRESHOLD], rec_thresholds=RECALL_POINTS.tolist(),
                                  backend="faster_coco_eval", max_detection_thresholds=[1, 10, MAX_DETECTIONS])
    metric.update(
        [{"boxes": tensor(p["boxes"], 4), "scores": torch.as_tensor(np.asarray(p["scores"]), dtype=torch.float64),
          "labels": torch.zeros(len(p["scores"]), dtype=torch.int64)} for p in predictions],
        # areas passed explicitly so that a lesion exactly at the threshold is "small" without rounding doubt
        [{"boxes": tensor(t, 4), "labels": torch.zeros(len(t), dtype=torch.int64),
          "area": torch.as_tensor(box_areas(t) / small_threshold * COCO_SMALL_AREA, dtype=torch.float64)}
         for t in targets],
    )
    result = metric.compute()
    values = (float(result["map_50"]), float(result["map_small"]))
    return tuple(math.nan if v < 0 else v for v in values)  # torchmetrics' -1: nothing to find


# --------------------------------------------------------------------------- per-image matches (for the bootstrap)

@dataclass(frozen=True)
class _Matches:
    """Every detection of a test set, in descending score order, with COCO's per-image match outcome."""

    image: np.ndarray     # (D,) image position of each detection
    true_pos: np.ndarray  # (D,) matched to a lesion that counts
    ignored: np.ndarray   # (D,) neither TP nor FP (matched to an ignored lesion, or unmatched and out of range)
    positives: np.ndarray  # (I,) lesions that count, per image

    def ap(self, weights: np.ndarray) -> float:
        """COCO's accumulate() with image i counted weights[i] times (a bootstrap replicate)."""
        n_pos = float(weights @ self.positives)
        if n_pos == 0:
            return math.nan
        w = weights[self.image] * ~self.ignored
        tp = np.cumsum(w * self.true_pos)
        fp = np.cumsum(w * ~self.true_pos)
        keep = w > 0  # a detection of an image drawn 0 times is not on the curve
        tp, fp = tp[keep], fp[keep]
        recall = tp / n_pos
        precision = np.maximum.accumulate((tp / np.maximum(tp + fp, np.finfo(np.float64).eps))[::-1])[::-1]
        found = np.searchsorted(recall, RECALL_POINTS, side="left")
        return float(np.where(found < len(recall), precision[np.minimum(found, len(recall) - 1)], 0.0).mean())


def _match_image(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, max_area: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """COCO's evaluateImg for one image, one class, IoU 0.5: (order, true_pos, ignored, counted lesions)."""
    order = np.argsort(-scores, kind="mergesort")[:MAX_DETECTIONS]
    boxes = boxes[order]
    gt_ignore = box_areas(gt) > max_area
    gt = gt[np.argsort(gt_ignore, kind="mergesort")]  # lesions that count first, as COCO sorts them
    gt_ignore = np.sort(gt_ignore, kind="mergesort")
    iou = box_iou(torch.as_tensor(boxes), torch.as_tensor(gt)).numpy() if len(gt) and len(boxes) else None
    taken = np.zeros(len(gt), bool)
    match = np.full(len(boxes), -1)
    for d in range(len(boxes)):
        best, m = min(IOU_THRESHOLD, 1 - 1e-10), -1
        for g in range(len(gt)):
            if taken[g]:
                continue
            if m > -1 and not gt_ignore[m] and gt_ignore[g]:
                break  # a counted lesion already matched: never prefer an ignored one
            if iou[d, g] < best:
                continue
            best, m = iou[d, g], g
        if m > -1:
            taken[m], match[d] = True, m
    matched = match > -1
    ignored = box_areas(boxes) > max_area  # unmatched: by the detection's own area
    ignored[matched] = gt_ignore[match[matched]]  # matched: by its lesion's
    return order, matched & ~ignored, ignored, int((~gt_ignore).sum())


def _matches(predictions: list[Prediction], targets: list[np.ndarray], max_area: float) -> _Matches:
    images, scores, tps, igs, positives = [], [], [], [], []
    for i, (p, gt) in enumerate(zip(predictions, targets)):
        s = np.asarray(p["scores"], dtype=np.float64)
        order, tp, ig, n_pos = _match_image(np.asarray(p["boxes"], np.float64).reshape(-1, 4), s, gt, max_area)
        images.append(np.full(len(order), i))
        scores.append(s[order])
        tps.append(tp)
        igs.append(ig)
        positives.append(n_pos)
    order = np.argsort(-_concat(scores, float), kind="mergesort")  # stable: ties keep image order, as COCO's
    return _Matches(_concat(images, int)[order], _concat(tps, bool)[order], _concat(igs, bool)[order],
                    np.asarray(positives, dtype=np.float64))


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate([np.empty(0, dtype), *parts]).astype(dtype)


# --------------------------------------------------------------------------- the paper's numbers

def _predictions_of(detector_or_predictions: _Predicts | list[Prediction], test_df: pd.DataFrame) -> list[Prediction]:
    if hasattr(detector_or_predictions, "predict"):
        return detector_or_predictions.predict(test_df)
    return list(detector_or_predictions)


def _scored(predictions: list[Prediction], test_df: pd.DataFrame) -> tuple[list[Prediction], list[np.ndarray]]:
    _check_predictions(predictions, len(test_df))
    rows = scorable_rows(test_df)
    return [predictions[i] for i in rows], lesion_boxes(test_df.iloc[rows])


def _replicates(matches: list[_Matches], n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, len(matches)) metric values on the same resampled images for every set of matches (paired)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(matches)))
    for b in range(n_boot):
        weights = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(np.float64)
        out[b] = [m.ap(weights) for m in matches]
    return out


def _ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = values[~np.isnan(values)]  # a replicate without a (small) lesion has no AP
    if len(values) == 0:
        return math.nan, math.nan
    alpha = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [alpha, 100 - alpha])
    return float(lo), float(hi)


def evaluate_detection(detector_or_predictions: _Predicts | list[Prediction], test_df: pd.DataFrame,
                       small_threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """AP50 and AP50_small with percentile-bootstrap 95% CIs over resampled images (Fig 3b–c, §4.5).

    `detector_or_predictions`: a `Detector` (or anything with `.predict(df)`), or
    its predictions, one dict per row of `test_df` with relative `boxes` and `scores`.
    """
    predictions, targets = _scored(_predictions_of(detector_or_predictions, test_df), test_df)
    ap, ap_small = average_precision(predictions, targets, small_threshold)
    reps = _replicates([_matches(predictions, targets, math.inf), _matches(predictions, targets, small_threshold)],
                       len(targets), n_boot, seed)
    areas = _concat([box_areas(t) for t in targets], float)
    (ap_lo, ap_hi), (small_lo, small_hi) = _ci(reps[:, 0]), _ci(reps[:, 1])
    return {
        "ap50": ap, "ap50_lo": ap_lo, "ap50_hi": ap_hi,
        "ap50_small": ap_small, "ap50_small_lo": small_lo, "ap50_small_hi": small_hi,
        "small_threshold": float(small_threshold),
        "n_images": len(targets), "n_images_with_lesions": int(sum(len(t) > 0 for t in targets)),
        "n_lesions": len(areas), "n_small_lesions": int((areas <= small_threshold).sum()),
    }


def paired_bootstrap_p(preds_a: list[Prediction], preds_b: list[Prediction], test_df: pd.DataFrame,
                       small_threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Two-sided P-values for AP50 and AP50_small of detector A vs B on the same test images (Fig 3b–c).

    Images are resampled once per replicate for both detectors (paired). The
    replicate differences, centred on the observed difference, estimate its
    null distribution: P = (1 + #{|Δ* − Δ| ≥ |Δ|}) / (1 + n_boot), so the
    smallest reportable P is 1 / (1 + n_boot).
    """
    pa, targets = _scored(preds_a, test_df)
    pb, _ = _scored(preds_b, test_df)
    out = {}
    for name, max_area in (("ap50", math.inf), ("ap50_small", small_threshold)):
        ma, mb = _matches(pa, targets, max_area), _matches(pb, targets, max_area)
        ones = np.ones(len(targets))
        observed = ma.ap(ones) - mb.ap(ones)
        reps = _replicates([ma, mb], len(targets), n_boot, seed)
        diffs = reps[:, 0] - reps[:, 1]
        diffs = diffs[~np.isnan(diffs)]
        out[f"{name}_diff"] = float(observed)
        if math.isnan(observed) or len(diffs) == 0:
            out[f"{name}_p"] = math.nan
            continue
        extreme = np.abs(diffs - observed) >= abs(observed) - 1e-12  # tolerance: a replicate equal to Δ counts
        out[f"{name}_p"] = float((1 + extreme.sum()) / (1 + len(diffs)))
    return out
