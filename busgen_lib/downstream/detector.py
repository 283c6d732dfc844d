"""The lesion detector of Fig 3a–c (§4.4.1): torchvision Faster R-CNN on a timm backbone, trained from scratch.

The paper used Mask R-CNN with a ViT-L backbone; with boxes as the only labels
(generated images carry their requested boxes as pseudo-labels) Faster R-CNN is
the same detector without the mask head. The backbone is a timm model built
with `features_only=True` (one feature map, chosen per profile in
`profiles.DETECTOR_SETTINGS`), so the detector and the classifiers share a model
family. Images are grayscale; images without lesions are negatives (empty
targets), so the detector learns to stay silent on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.transforms import v2
from tqdm.auto import tqdm

from busgen_lib.data.augment import prepare
from busgen_lib.data.dataset import derive_seed, load_grayscale
from busgen_lib.data.manifest import resolve, rows_fingerprint
from busgen_lib.errors import DataError
from busgen_lib.evaluate.detection import Prediction, lesion_boxes, scorable_rows
from busgen_lib.profiles import DetectorSettings, detector_settings

WEIGHTS_FILE = "detector.safetensors"
CONFIG_FILE = "detector.json"
# Fixed intensity normalisation of [0, 1] grayscale input (no pretrained statistics exist to match).
IMAGE_MEAN, IMAGE_STD = [0.5], [0.25]


# --------------------------------------------------------------------------- model

class TimmBackbone(nn.Module):
    """One feature map of a timm model, with the `out_channels` torchvision's detectors read."""

    def __init__(self, name: str, feature_index: int, image_size: int) -> None:
        super().__init__()
        kwargs = dict(pretrained=False, features_only=True, out_indices=(feature_index,), in_chans=1)
        try:  # ViTs size their token grid to the input; convnets take any size and refuse the argument
            self.body = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:
            self.body = timm.create_model(name, **kwargs)
        self.out_channels = self.body.feature_info.channels()[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


def build_model(settings: DetectorSettings) -> FasterRCNN:
    """Faster R-CNN (two classes: background, lesion) on one backbone feature map, anchors from the settings."""
    backbone = TimmBackbone(settings.backbone, settings.feature_index, settings.image_size)
    sizes = tuple(max(1, round(f * settings.image_size)) for f in settings.anchor_fractions)
    anchors = AnchorGenerator(sizes=(sizes,), aspect_ratios=(settings.aspect_ratios,))
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=settings.roi_output, sampling_ratio=2)
    head = TwoMLPHead(backbone.out_channels * settings.roi_output ** 2, settings.head_dim)
    (train_proposals, test_proposals) = settings.proposals
    return FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors, box_roi_pool=pool, box_head=head,
        box_predictor=FastRCNNPredictor(settings.head_dim, 2),
        # images arrive at image_size already, so the transform's resize is the identity
        min_size=settings.image_size, max_size=settings.image_size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
        box_batch_size_per_image=settings.roi_samples, rpn_batch_size_per_image=settings.rpn_samples,
        rpn_pre_nms_top_n_train=train_proposals, rpn_pre_nms_top_n_test=test_proposals,
        rpn_post_nms_top_n_train=train_proposals, rpn_post_nms_top_n_test=test_proposals,
    )


# --------------------------------------------------------------------------- data

def _augmentation(settings: DetectorSettings) -> v2.Transform:
    """Horizontal flips and a small zoom/shift. No vertical flip: depth (skin at the top, shadowing below
    a lesion) has a direction in ultrasound. Boxes pushed off the image are dropped by SanitizeBoundingBoxes."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=0.0, translate=(0.05, 0.05), scale=settings.scale_jitter),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])


# Decoded, resized images a dataset keeps in memory, at most (float32): reading and resizing each PNG again every
# epoch was 1/8 of a demo training step. A larger set (the paper's) is read from disk each time.
CACHE_BYTES = 2**30


class DetectionDataset(Dataset):
    """Manifest rows → (1 x S x S image in [0, 1], torchvision target with pixel xyxy boxes)."""

    def __init__(self, df: pd.DataFrame, image_size: int, boxes: list[np.ndarray] | None = None,
                 transform: v2.Transform | None = None, seed: int = 0) -> None:
        self.df, self.size, self.transform, self.seed, self.epoch = df, image_size, transform, seed, 0
        self.boxes = boxes if boxes is not None else [np.zeros((0, 4))] * len(df)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if len(df) * image_size ** 2 * 4 <= CACHE_BYTES else None)

    def __len__(self) -> int:
        return len(self.df)

    def _prepared(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i's image and relative boxes before augmentation (the transforms never modify them in place)."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        prepared = prepare(load_grayscale(resolve(self.df, "image", i)),
                           torch.as_tensor(self.boxes[i], dtype=torch.float32), self.size)
        if self.cache is not None:
            self.cache[i] = prepared
        return prepared

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, relative = self._prepared(i)
        target = {"boxes": tv_tensors.BoundingBoxes(relative * self.size, format="XYXY",
                                                    canvas_size=(self.size, self.size)),
                  "labels": torch.ones(len(relative), dtype=torch.int64)}
        if self.transform is not None:
            # a per-sample stream: the same (seed, epoch, row) always gets the same augmentation
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, self.epoch, i))
                image, target = self.transform(tv_tensors.Image(image), target)
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}


def _collate(batch: list) -> tuple[list, list]:
    return tuple(map(list, zip(*batch)))


# --------------------------------------------------------------------------- the detector

class Detector:
    """A trained Faster R-CNN with what it needs to predict again: settings, profile, seed, training data."""

    def __init__(self, model: FasterRCNN, settings: DetectorSettings, profile: str, seed: int,
                 train_fingerprint: str) -> None:
        self.model, self.settings, self.profile = model.eval(), settings, profile
        self.seed, self.train_fingerprint = seed, train_fingerprint

    @torch.no_grad()
    def predict(self, df: pd.DataFrame) -> list[Prediction]:
        """Per row: `boxes` (N x 4, relative xyxy, highest score first) and `scores` in [0, 1]."""
        self.model.eval()
        size = self.settings.image_size
        out: list[Prediction] = []
        loader = DataLoader(DetectionDataset(df, size), batch_size=self.settings.batch_size, collate_fn=_collate)
        for images, _ in loader:
            for det in self.model(images):
                out.append({"boxes": (det["boxes"] / size).clamp(0.0, 1.0).numpy().astype(np.float64),
                            "scores": det["scores"].numpy().astype(np.float64)})
        return out

    def save(self, folder: str | Path) -> Path:
        """Write the weights (safetensors) and `detector.json` (settings, profile, seed, training fingerprint)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, folder / WEIGHTS_FILE)
        meta = {"model": "faster_rcnn", "profile": self.profile, "seed": self.seed,
                "train_fingerprint": self.train_fingerprint, "settings": asdict(self.settings)}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Detector:
        """Rebuild a detector written by `save`."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise DataError(f"{folder} holds no detector ({CONFIG_FILE} and {WEIGHTS_FILE}): "
                            "give the folder that Detector.save or `downstream train --task detection` wrote")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["settings"].items()}
        settings = DetectorSettings(**fields)
        model = build_model(settings)
        model.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return cls(model, settings, meta["profile"], meta["seed"], meta["train_fingerprint"])


def training_steps(train_df: pd.DataFrame, profile: str, **overrides) -> int:
    """Optimiser steps `train_detector` takes on these rows: epochs x batches per epoch (the last batch partial)."""
    settings = detector_settings(profile, **overrides)
    return settings.epochs * math.ceil(len(scorable_rows(train_df)) / settings.batch_size)


def train_detector(train_df: pd.DataFrame, profile: str, seed: int = 0, progress: bool = True,
                   **overrides) -> Detector:
    """Train Faster R-CNN from scratch on manifest rows (images with and without lesions), §4.4.1.

    Deterministic given `seed` on CPU: weights from `torch.manual_seed(seed)`,
    shuffling from a seeded generator, augmentation from (seed, epoch, row).
    Rows flagged `boxes_missing` are left out (their lesion has no box to learn).
    `overrides` replace fields of the profile's `DetectorSettings`.
    """
    settings = detector_settings(profile, **overrides)
    df = train_df.iloc[scorable_rows(train_df)]
    df.attrs = train_df.attrs
    boxes = lesion_boxes(df)
    if not any(len(b) for b in boxes):
        raise DataError("the training manifest has no lesion boxes: a detector needs images with boxed lesions")
    torch.manual_seed(seed)
    model = build_model(settings).train()
    data = DetectionDataset(df, settings.image_size, boxes, _augmentation(settings), seed)
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, collate_fn=_collate,
                        generator=torch.Generator().manual_seed(seed))
    steps = settings.epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with tqdm(total=steps, disable=not progress, desc="detector", unit="step") as bar:
        for epoch in range(settings.epochs):
            data.epoch = epoch
            for images, targets in loader:
                losses = model(images, targets)
                loss = sum(losses.values())
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"detector loss became {loss.item()} at epoch {epoch}: lower lr")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return Detector(model, settings, profile, seed, rows_fingerprint(df, ("image", "boxes")))
