"""Does conditioning work? Box, pathology and device control of generated images (notebook 01).

BUSGen is conditioned on pathology, device and lesion boxes (§4.3.1). Each
condition is checked by a probe trained only on REAL images (probes.py):

- box control: the segmenter's largest lesion in a generated image should lie
  in a requested box (hit rate; plus IoU of its bounding box with the box);
- pathology / device control: the classifier should name the requested class.

Every result carries a Wilson CI, the chance level, and the probe's score on
held-out real images: a generated image cannot be judged better than the
judge does on real ones, so that reference is the ceiling to read it against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from busgen_lib.data.dataset import boxes_to_mask, load_images, load_masks
from busgen_lib.data.schema import PATHOLOGIES, Box, parse_boxes
from busgen_lib.evaluate.probes import Probe, Segmenter, train_classifier, train_segmenter
from busgen_lib.evaluate.stats import proportion_ci

BoxesLike = str | Sequence[Sequence[float]]


def _as_boxes(value: BoxesLike) -> list[Box]:
    return parse_boxes(value) if isinstance(value, str) or value is None else [tuple(map(float, b)) for b in value]


def _as_box_tensor(value: BoxesLike) -> torch.Tensor:
    return torch.tensor(_as_boxes(value), dtype=torch.float32).reshape(-1, 4)


# --------------------------------------------------------------------------- results

@dataclass
class ControlResult:
    """One control measurement: value with its Wilson CI over n images, against chance and the real ceiling."""

    name: str
    value: float
    ci: tuple[float, float]
    n: int
    chance: float
    per_class: pd.DataFrame
    reference: float | None = None          # the probe's score on held-out REAL images
    extra: dict[str, float] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One display row: measure, value, CI, n, chance, real-data reference, and any extra measures."""
        row = {"measure": self.name, "value": self.value, "ci_lo": self.ci[0], "ci_hi": self.ci[1], "n": self.n,
               "chance": self.chance, "real_reference": self.reference, **self.extra}
        return pd.DataFrame([row])


def _rate_table(groups: pd.Series, correct: np.ndarray, column: str) -> pd.DataFrame:
    """Per group: n, hits, rate and Wilson CI."""
    rows = []
    for key, index in pd.Series(range(len(groups)), index=groups.to_numpy()).groupby(level=0, sort=False):
        hits, n = int(correct[index.to_numpy()].sum()), len(index)
        p, lo, hi = proportion_ci(hits, n)
        rows.append({column: key, "n": n, "correct": hits, "rate": p, "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows, columns=[column, "n", "correct", "rate", "ci_lo", "ci_hi"])


# --------------------------------------------------------------------------- box control

def lesion_box(mask: np.ndarray) -> tuple[tuple[float, float], Box] | None:
    """Centroid (x, y) and bounding box of the largest 8-connected component of a (S, S) mask, in relative
    image coordinates (pixel centres at (c + 0.5) / S); None when the mask is empty."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = np.nonzero(labels == 1 + int(sizes.argmax()))
    h, w = mask.shape
    centroid = ((cols.mean() + 0.5) / w, (rows.mean() + 0.5) / h)
    return centroid, (cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h)


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_control(segmenter: Segmenter, images: torch.Tensor, requested_boxes: Sequence[BoxesLike],
                requested_pathology: Sequence[str] | None = None) -> ControlResult:
    """Share of generated lesion images whose segmented lesion centroid falls inside a requested box.

    Only images with at least one requested box count. The lesion is the largest
    connected component of the segmenter's mask; an image where nothing is
    segmented is a failure. `extra` reports the mean IoU of that component's
    bounding box with the best-matching requested box (0 when none), and the
    share of images with any segmented lesion. Chance = the mean share of the
    image covered by the requested boxes (a lesion placed uniformly at random).
    """
    boxes = [_as_boxes(b) for b in requested_boxes]
    if len(boxes) != len(images):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
    keep = np.array([len(b) > 0 for b in boxes])
    if not keep.any():
        raise ValueError("no image has a requested box: box control needs generated lesion images")
    index = np.flatnonzero(keep)
    masks = segmenter.predict_mask(images[torch.as_tensor(index)])
    hits, ious, found, coverage = [], [], [], []
    size = images.shape[-1]
    for mask, i in zip(masks, index):
        requested = boxes[i]
        lesion = lesion_box(mask)
        found.append(lesion is not None)
        coverage.append(float(boxes_to_mask(_as_box_tensor(requested), size).mean()))
        if lesion is None:
            hits.append(False)
            ious.append(0.0)
            continue
        (cx, cy), bbox = lesion
        hits.append(any(x0 <= cx < x1 and y0 <= cy < y1 for x0, y0, x1, y1 in requested))
        ious.append(max(_iou(bbox, b) for b in requested))
    hits = np.array(hits)
    p, lo, hi = proportion_ci(int(hits.sum()), len(hits))
    groups = (pd.Series(np.asarray(requested_pathology, dtype=object)[index]) if requested_pathology is not None
              else pd.Series(["all"] * len(index)))
    table = _rate_table(groups, hits, "pathology")
    table["mean_iou"] = pd.Series(ious).groupby(groups.to_numpy()).mean().reindex(table["pathology"]).to_numpy()
    return ControlResult("box control (centroid in box)", p, (lo, hi), len(hits), float(np.mean(coverage)), table,
                         segmenter.reference_box_hit,
                         {"mean_iou": float(np.mean(ious)), "lesion_found": float(np.mean(found))})


# --------------------------------------------------------------------------- label control

def _label_control(name: str, classifier: Probe, images: torch.Tensor, requested: Sequence[str]) -> ControlResult:
    requested = pd.Series([str(r) for r in requested])
    if len(requested) != len(images):
        raise ValueError(f"{len(images)} images but {len(requested)} requested labels")
    unknown = sorted(set(requested) - set(classifier.classes))
    if unknown:
        raise ValueError(f"{name}: requested classes {unknown} are not among the classifier's classes "
                         f"{list(classifier.classes)}; train the probe on real data that contains them")
    target = requested.map({c: k for k, c in enumerate(classifier.classes)}).to_numpy()
    correct = classifier.predict(images) == target
    p, lo, hi = proportion_ci(int(correct.sum()), len(correct))
    chance = float(requested.value_counts(normalize=True).max())  # always answering the commonest request
    return ControlResult(name, p, (lo, hi), len(correct), chance, _rate_table(requested, correct, "requested"),
                         classifier.reference_accuracy)


def pathology_control(classifier: Probe, images: torch.Tensor, requested_pathology: Sequence[str]) -> ControlResult:
    """Accuracy of a real-trained pathology classifier on generated images, overall and per requested class.

    Chance = the share of the commonest requested class (1/3 for a balanced plan).
    """
    return _label_control("pathology control (accuracy)", classifier, images, requested_pathology)


def device_control(classifier: Probe, images: torch.Tensor, requested_device: Sequence[str]) -> ControlResult:
    """Accuracy of a real-trained device classifier on generated images, overall and per requested device."""
    return _label_control("device control (accuracy)", classifier, images, requested_device)


# --------------------------------------------------------------------------- probes on a real manifest

@dataclass
class ControlProbes:
    """The three judges, trained on a real train split, and their scores on its held-out test split."""

    pathology: Probe
    device: Probe | None
    segmenter: Segmenter
    size: int
    report: pd.DataFrame

    def evaluate(self, generated: pd.DataFrame, images: torch.Tensor | None = None) -> list[ControlResult]:
        """All control measures for a generated manifest (its pathology, device and boxes are the requests)."""
        images = load_images(generated, self.size) if images is None else images
        results = [box_control(self.segmenter, images, generated["boxes"].tolist(), generated["pathology"].tolist()),
                   pathology_control(self.pathology, images, generated["pathology"].tolist())]
        if self.device is not None:
            results.append(device_control(self.device, images, generated["device"].astype(str).tolist()))
        return results


def _rows(df: pd.DataFrame, splits: Sequence[str]) -> pd.DataFrame:
    part = df[df["split"].astype(str).isin(list(splits))]
    part.attrs = dict(df.attrs)
    return part


def fit_control_probes(real_df: pd.DataFrame, size: int = 64, seed: int = 0, epochs: int = 30,
                       seg_epochs: int = 30, width: int = 16, seg_width: int = 8,
                       train_splits: Sequence[str] = ("train", "val"), progress: bool = True) -> ControlProbes:
    """Train the pathology classifier, device classifier and segmenter on real images of `train_splits`.

    The `test` split is held out and gives the real-data references: classifier
    accuracies, segmenter Dice and the box-control hit rate on lesion images with
    their true boxes. Training uses train + val by default: with splits by
    patient a small dataset has few patients, and the probes generalise better
    from more of them than from choosing an epoch on a handful (the last epoch
    of the one-cycle schedule is kept). The device probe is None when fewer
    than two devices are named.
    """
    parts = {"train": _rows(real_df, train_splits), "test": _rows(real_df, ["test"])}
    if len(parts["train"]) == 0 or len(parts["test"]) == 0:
        raise ValueError(f"fit_control_probes needs rows with split in {list(train_splits)} and rows with "
                         f"split == 'test'; the manifest's splits are {sorted(set(real_df['split'].astype(str)))}")
    images = {s: load_images(p, size, progress) for s, p in parts.items()}

    def pick(split: str, column: str, classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        names = parts[split][column].astype(str)
        ok = np.array(names.isin(classes))
        labels = torch.tensor(np.array(names[ok].map({c: k for k, c in enumerate(classes)})))
        return (images[split][torch.from_numpy(ok)], labels) if ok.any() else None

    def fit(column: str, classes: tuple[str, ...], flip: bool, offset: int) -> Probe:
        probe = train_classifier(*pick("train", column, classes), len(classes), epochs, seed + offset,
                                 classes=classes, flip=flip, width=width, progress=progress)
        test = pick("test", column, classes)
        probe.reference_accuracy = probe.accuracy(*test) if test is not None else None
        return probe

    pathologies = tuple(p for p in PATHOLOGIES if p in set(real_df["pathology"].astype(str)))
    pathology = fit("pathology", pathologies, flip=True, offset=0)
    devices = tuple(sorted({str(d) for d in real_df["device"] if str(d).strip() not in ("", "nan", "None")}))
    # No flips for the device: its overlay (tick side, text corner) is a left/right cue.
    device = fit("device", devices, flip=False, offset=1) if len(devices) >= 2 else None

    segmenter = train_segmenter(images["train"], load_masks(parts["train"], size), seg_epochs, seed + 2,
                                width=seg_width, progress=progress)
    test = parts["test"]
    lesion = np.array([len(_as_boxes(b)) > 0 for b in test["boxes"]])
    test_images = images["test"][torch.from_numpy(lesion)]
    segmenter.reference_dice = float(segmenter.dice(test_images, load_masks(test[lesion], size)).mean())
    real_box = box_control(segmenter, test_images, test["boxes"][lesion].tolist())
    segmenter.reference_box_hit = real_box.value

    report = pd.DataFrame([
        {"probe": "pathology classifier", "metric": "accuracy", "real_test": pathology.reference_accuracy,
         "chance": 1 / len(pathologies), "n_train": len(parts["train"])},
        {"probe": "device classifier", "metric": "accuracy",
         "real_test": device.reference_accuracy if device else None,
         "chance": 1 / len(devices) if devices else None, "n_train": len(parts["train"])},
        {"probe": "lesion segmenter", "metric": "Dice (lesion images)", "real_test": segmenter.reference_dice,
         "chance": None, "n_train": len(parts["train"])},
        {"probe": "lesion segmenter", "metric": "box control, true boxes", "real_test": real_box.value,
         "chance": real_box.chance, "n_train": len(parts["train"])},
    ])
    return ControlProbes(pathology, device, segmenter, size, report)
