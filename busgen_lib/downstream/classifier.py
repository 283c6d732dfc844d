"""BUS-DM: a timm image classifier trained on a manifest (generated, real, or both) for a binary task (§4.4).

The paper's downstream models are ViT-L classifiers; the backbone here is a
timm model named by the profile (`paper`: vit_large_patch16_224 at 224 px),
built with one input channel and two classes. A `DiagnosticModel` wraps the
trained network with its record (task, backbone, input size, training
manifests, profile, seed) so that a model folder can be checked against
what it is asked to do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from busgen_lib.downstream.tasks import Task
from busgen_lib.data.manifest import rows_fingerprint
from busgen_lib.downstream.training import (as_inputs, augment_batch, balanced_batches, classification_augment,
                                            manifest_record, train_loop)
from busgen_lib.errors import UsageError
from busgen_lib.profiles import DownstreamProfile, get_downstream

WEIGHTS, RECORD = "model.safetensors", "model.json"
PREDICT_BATCH = 64


def downstream_settings(profile: str, backbone: str | None = None, input_size: int | None = None
                        ) -> DownstreamProfile:
    """The profile's downstream settings; with `backbone`, that timm model at its own defaults instead (a study
    whose training sets are too small for the profile's ViT trained from scratch, e.g. few-shot DCIS); with
    `input_size`, images resized to that instead (a ViT's `img_size` follows it)."""
    settings = get_downstream(profile)
    if backbone is not None:
        settings = replace(settings, backbone=backbone, backbone_kwargs={})
    if input_size is not None:
        kwargs = dict(settings.backbone_kwargs)
        settings = replace(settings, input_size=input_size,
                           backbone_kwargs=kwargs | {"img_size": input_size} if "img_size" in kwargs else kwargs)
    return settings


def create_backbone(backbone: str, backbone_kwargs: dict, num_classes: int = 2) -> torch.nn.Module:
    """timm.create_model(backbone, 1 input channel, `num_classes` outputs, untrained: no weights can be downloaded)."""
    return timm.create_model(backbone, pretrained=False, num_classes=num_classes, in_chans=1, **backbone_kwargs)


@dataclass
class DiagnosticModel:
    """A trained binary classifier and its record; the interface BUS-DM and Baseline-CLIP share."""

    network: torch.nn.Module
    record: dict = field(default_factory=dict)

    @property
    def task(self) -> Task:
        return Task.parse(self.record["task"])

    @property
    def input_size(self) -> int:
        return int(self.record["input_size"])

    @torch.no_grad()
    def _batched(self, data: pd.DataFrame | torch.Tensor, fn) -> np.ndarray:
        images = as_inputs(data, self.input_size)
        self.network.eval()
        return torch.cat([fn(x) for x in images.split(PREDICT_BATCH)]).numpy()

    def predict_proba(self, data: pd.DataFrame | torch.Tensor) -> np.ndarray:
        """P(positive class) per image: manifest rows or an (N, 1, H, W) tensor in [-1, 1]."""
        return self._batched(data, lambda x: self.network(x).softmax(dim=1)[:, 1])

    def features(self, data: pd.DataFrame | torch.Tensor) -> np.ndarray:
        """The pooled ([CLS] for a ViT) features before the linear head, for t-SNE and GradCAM (Fig 5c–d)."""
        net = self.network
        return self._batched(data, lambda x: net.forward_head(net.forward_features(x), pre_logits=True))

    def save(self, folder: str | Path) -> Path:
        """Write model.safetensors and model.json (the record) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.network.state_dict().items()}, str(folder / WEIGHTS))
        (folder / RECORD).write_text(json.dumps(self.record, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, task: Task | str | None = None) -> DiagnosticModel:
        """A saved model; with `task`, a folder trained for another task is a UsageError."""
        folder = Path(folder)
        if not (folder / RECORD).exists() or not (folder / WEIGHTS).exists():
            raise UsageError(f"{folder}: not a classifier folder (expected {RECORD} and {WEIGHTS}); "
                             "train one with `busgen downstream train`")
        record = json.loads((folder / RECORD).read_text())
        if task is not None and str(task) != record["task"]:
            raise UsageError(f"{folder}: this model was trained for task {record['task']!r}, not {str(task)!r}")
        network = create_backbone(record["backbone"], record["backbone_kwargs"])
        network.load_state_dict(load_file(str(folder / WEIGHTS)))
        return cls(network.eval(), record)


def fit_classifier(network: torch.nn.Module, images: torch.Tensor, y: np.ndarray, settings: DownstreamProfile,
                   lr: float, epochs: int, seed: int, progress: bool = False) -> list[float]:
    """Cross-entropy training of `network` on class-balanced, augmented batches; returns per-epoch losses."""
    torch.manual_seed(seed)  # the v2 augmentations draw from torch's global generator
    transform = classification_augment(settings.input_size)
    labels = torch.as_tensor(y, dtype=torch.int64)
    network.train()

    def loss(index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(network(augment_batch(images[index], transform)), labels[index])

    return train_loop(network.parameters(), balanced_batches(y, settings.batch_size, seed), loss, epochs, lr,
                      settings.weight_decay, progress=progress, desc="bus-dm")


def make_record(kind: str, task: Task, settings: DownstreamProfile, profile: str, seed: int, lr: float, epochs: int,
                rows: pd.DataFrame, y: np.ndarray, sources: Sequence[str | Path]) -> dict:
    """What a model folder says about itself: enough to rebuild it and to refuse misuse."""
    return {"model": kind, "task": str(task), "backbone": settings.backbone,
            "backbone_kwargs": dict(settings.backbone_kwargs), "input_size": settings.input_size,
            "profile": profile, "seed": seed, "lr": lr, "epochs": epochs,
            "n_train": int(len(y)), "n_positive": int(y.sum()), "train_rows_sha256": rows_fingerprint(rows),
            "manifests": manifest_record(sources)}


def train_classifier(train_df: pd.DataFrame, task: Task, profile: str, seed: int = 0, lr: float | None = None,
                     epochs: int | None = None, sources: Sequence[str | Path] = (),
                     progress: bool = False, backbone: str | None = None, input_size: int | None = None
                     ) -> DiagnosticModel:
    """BUS-DM: a profile backbone trained from scratch on the task's rows of `train_df` (deterministic per seed).

    `lr`/`epochs` default to the profile's recipe (use `cross_validate` to choose
    them); `sources` are the manifest files recorded with the model; `backbone`
    and `input_size` replace the profile's (`downstream_settings`).
    """
    settings = downstream_settings(profile, backbone, input_size)
    lr, epochs = lr if lr is not None else settings.lr, epochs if epochs is not None else settings.epochs
    rows, y = task.select(train_df)
    images = as_inputs(rows, settings.input_size)
    torch.manual_seed(seed)
    network = create_backbone(settings.backbone, settings.backbone_kwargs)
    fit_classifier(network, images, y, settings, lr, epochs, seed, progress)
    record = make_record("bus-dm", task, settings, profile, seed, lr, epochs, rows, y, sources)
    return DiagnosticModel(network.eval(), record)
