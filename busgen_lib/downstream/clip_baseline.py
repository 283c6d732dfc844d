"""Baseline-CLIP: the paper's comparator, an image–text model trained on real reports, then fine-tuned (§2).

The paper starts from PMC-CLIP weights, continues contrastive training on the
image–report pairs of BUS-3.5M, and fine-tunes on each real downstream set,
with the same ViT-L image encoder as BUS-DM "for a fair comparison". Here the
reports are composed from each image's labelled attributes (`compose_report`),
the image tower is the profile's timm backbone (open_clip's timm tower, keys
`visual.trunk.*`), the text tower is small outside `paper`, and a user's own
open_clip weights can be loaded first (`load_clip_weights`). Fine-tuning keeps
the image trunk, gives it a linear head, and yields the same `DiagnosticModel`
as BUS-DM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import open_clip
import pandas as pd
import torch
from open_clip.factory import load_checkpoint
from open_clip.loss import ClipLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from busgen_lib.atomic import atomic_path
from busgen_lib.downstream.classifier import (DiagnosticModel, create_backbone, downstream_settings, fit_classifier,
                                              make_record)
from busgen_lib.downstream.tasks import Task
from busgen_lib.data.manifest import rows_fingerprint
from busgen_lib.downstream.training import (as_inputs, augment_batch, classification_augment, file_sha256,
                                            train_loop)
from busgen_lib.errors import DataError
from busgen_lib.profiles import DownstreamProfile, get_downstream

# (report label, manifest columns that may hold it): the phantom and BrEaST-Lesions-USG name some differently.
REPORT_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Pathology", ("pathology",)),
    ("BI-RADS", ("birads",)),
    ("Shape", ("shape",)),
    ("Margin", ("margin",)),
    ("Orientation", ("orientation",)),
    ("Echo pattern", ("echo_pattern", "echogenicity")),
    ("Posterior features", ("posterior", "posterior_features")),
)
_NOT_GIVEN = {"", "nan", "none", "no", "not applicable", "not available"}


# --------------------------------------------------------------------------- reports

def _value(row: pd.Series, columns: tuple[str, ...]) -> str | None:
    for column in columns:
        if column in row.index and str(row[column]).strip().lower() not in _NOT_GIVEN and not pd.isna(row[column]):
            return str(row[column]).strip()
    return None


def compose_report(row: pd.Series) -> str:
    """A one-line report of an image's labelled attributes, e.g. "Pathology: benign. BI-RADS: 3. Shape: oval."

    Fields the manifest lacks or leaves blank ("", "not applicable", "not
    available") are omitted. "none" and "no" are omitted too: the phantom and
    BrEaST-Lesions-USG write them for absent posterior features, which a report
    does not mention.
    """
    parts = [f"{label}: {value}." for label, columns in REPORT_FIELDS if (value := _value(row, columns))]
    return " ".join(parts)


# --------------------------------------------------------------------------- the model

def build_clip(settings: DownstreamProfile) -> open_clip.CLIP:
    """An open_clip CLIP whose image tower is the profile's timm backbone (1 channel, input_size px).

    open_clip's timm tower creates the named model with its defaults (3 channels,
    224 px), so its trunk is replaced by the BUS-DM backbone, and the projection
    is sized to that trunk; key names stay open_clip's, so its checkpoints load.
    """
    vision = CLIPVisionCfg(timm_model_name=settings.backbone, timm_pool="", timm_proj="linear",
                           image_size=settings.input_size)
    text = CLIPTextCfg(context_length=settings.clip_context_length, width=settings.clip_text_width,
                       heads=settings.clip_text_heads, layers=settings.clip_text_layers)
    model = open_clip.CLIP(settings.clip_embed_dim, vision, text)
    trunk = create_backbone(settings.backbone, settings.backbone_kwargs, num_classes=0)
    model.visual.trunk = trunk
    model.visual.head.proj = torch.nn.Linear(trunk.num_features, settings.clip_embed_dim, bias=False)
    return model


def load_clip_weights(path: str | Path, profile: str | open_clip.CLIP = "demo") -> open_clip.CLIP:
    """The profile's CLIP (or the given model) with a user's open_clip state dict / checkpoint loaded from `path`.

    Accepts what open_clip writes: a bare state dict, {"state_dict": ...}, a
    "module."-prefixed DDP dict, or .safetensors. Weights of another shape or
    with other keys are a DataError naming the file.
    """
    path = Path(path)
    model = build_clip(get_downstream(profile)) if isinstance(profile, str) else profile
    if not path.is_file():
        raise DataError(f"{path}: no such CLIP weights file")
    try:
        load_checkpoint(model, str(path), strict=True)
    except Exception as error:  # torch raises RuntimeError/KeyError/UnpicklingError...: all mean "not these weights"
        detail = " ".join(str(error).strip().splitlines()[:3])[:400] or type(error).__name__
        tower = model.visual.trunk.__class__.__name__
        raise DataError(f"{path}: not open_clip weights of this CLIP (image tower {tower}, embed dim "
                        f"{model.text_projection.shape[1]}): {detail}") from None
    return model


def pretrain_clip(model: open_clip.CLIP, images: torch.Tensor, reports: Sequence[str], settings: DownstreamProfile,
                  seed: int, progress: bool = False, epochs: int | None = None) -> list[float]:
    """Contrastive training on image–report pairs with open_clip's ClipLoss (symmetric InfoNCE), for `epochs`
    (default: the profile's clip_epochs)."""
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=settings.clip_context_length)(list(reports))
    transform = classification_augment(settings.input_size)
    loss_fn = ClipLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()

    def batches(epoch: int) -> list[torch.Tensor]:
        return list(torch.randperm(len(images), generator=generator).split(settings.batch_size))

    def loss(index: torch.Tensor) -> torch.Tensor:
        image_features, text_features, scale = model(augment_batch(images[index], transform), tokens[index])
        return loss_fn(image_features, text_features, scale)

    return train_loop(model.parameters(), batches, loss, settings.clip_epochs if epochs is None else epochs,
                      settings.clip_lr, settings.weight_decay, progress=progress, desc="clip")


def _contrastive_clip(corpus: pd.DataFrame, settings: DownstreamProfile, seed: int, clip_weights: str | Path | None,
                      epochs: int, progress: bool) -> open_clip.CLIP:
    """A CLIP seeded by `seed` (or loaded from `clip_weights`), then trained `epochs` on `corpus`'s reports."""
    torch.manual_seed(seed)
    clip = build_clip(settings)
    if clip_weights is not None:
        load_clip_weights(clip_weights, clip)
    if epochs:
        reports = [compose_report(row) for _, row in corpus.iterrows()]
        pretrain_clip(clip, as_inputs(corpus, settings.input_size), reports, settings, seed, progress, epochs)
    return clip


def pretrained_clip(corpus: pd.DataFrame, profile: str, out_dir: str | Path, seed: int = 0,
                    backbone: str | None = None, input_size: int | None = None, progress: bool = False) -> Path:
    """The contrastive pretraining on `corpus`, done once: weights for `train_baseline_clip(clip_weights=...,
    clip_epochs=0)`.

    The paper's Baseline-CLIP is one pretrained model fine-tuned per task, so a
    study's seeds share it; pretraining per seed would cost the most of each fit.
    The file, `out_dir/clip-<key>.pt`, is named by the corpus rows, the settings
    and the seed, so a rerun reads it back and other data never reuses it.
    """
    settings = downstream_settings(profile, backbone, input_size)
    key = hashlib.sha256(json.dumps([rows_fingerprint(corpus), asdict(settings), seed], default=str).encode())
    path = Path(out_dir) / f"clip-{key.hexdigest()[:16]}.pt"
    if not path.exists():
        clip = _contrastive_clip(corpus, settings, seed, None, settings.clip_epochs, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(clip.state_dict(), tmp)
    return path


def train_baseline_clip(train_df: pd.DataFrame, task: Task, profile: str, seed: int = 0, lr: float | None = None,
                        epochs: int | None = None, sources: Sequence[str | Path] = (),
                        pretrain_df: pd.DataFrame | None = None, clip_weights: str | Path | None = None,
                        progress: bool = False, backbone: str | None = None, clip_epochs: int | None = None,
                        input_size: int | None = None) -> DiagnosticModel:
    """Baseline-CLIP for `task`: contrastive pretraining on reports, then fine-tuning the image trunk + linear head.

    Pretraining uses every row of `pretrain_df` (default: all rows of
    `train_df`, normal images included: a report needs no task label), starting
    from `clip_weights` when given, for `clip_epochs` (default: the profile's; 0 with
    weights from `pretrained_clip`: fine-tuning only). Fine-tuning follows BUS-DM's recipe
    (`lr`/`epochs` default to the profile's) on the task's rows of `train_df`. `backbone` and `input_size`
    replace the profile's image tower and image size (`classifier.downstream_settings`), as for BUS-DM.
    """
    settings = downstream_settings(profile, backbone, input_size)
    lr, epochs = lr if lr is not None else settings.lr, epochs if epochs is not None else settings.epochs
    corpus = train_df if pretrain_df is None else pretrain_df
    clip_epochs = settings.clip_epochs if clip_epochs is None else clip_epochs
    clip = _contrastive_clip(corpus, settings, seed, clip_weights, clip_epochs, progress)

    rows, y = task.select(train_df)
    network = clip.visual.trunk
    torch.manual_seed(seed)
    network.reset_classifier(2)  # the linear head on the CLIP image trunk (timm's classifier)
    fit_classifier(network, as_inputs(rows, settings.input_size), y, settings, lr, epochs, seed, progress)
    record = make_record("baseline-clip", task, settings, profile, seed, lr, epochs, rows, y, sources)
    pretrained_here = corpus if clip_epochs else corpus.iloc[:0]  # clip_epochs 0: the weights carry the pretraining
    record["clip"] = {"pretrain_rows": len(pretrained_here), "pretrain_rows_sha256": rows_fingerprint(pretrained_here),
                      "clip_epochs": clip_epochs, "embed_dim": settings.clip_embed_dim,
                      "weights": None if clip_weights is None else {"path": str(Path(clip_weights).resolve()),
                                                                    "sha256": file_sha256(clip_weights)}}
    return DiagnosticModel(network.eval(), record)

