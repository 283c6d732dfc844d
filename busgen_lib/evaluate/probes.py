"""Small judges trained on REAL images: a CNN classifier and a mini-UNet lesion segmenter.

Conditioning is measured by asking a model that has only ever seen real images
what it sees in a generated one (control.py): is the requested pathology
recognisable, the requested device, is the lesion where the box asked for it?

Both networks are hand-written, pure torch. timm's smallest backbones
(resnet10t, mobilenetv3_small, efficientnet_b0) carry ImageNet-sized stems
and ~1–5M parameters; at 64 px on a 2-core CPU they do not train to a useful
accuracy within the demo budget of well under a minute, while the ~0.1M-
parameter nets below do. They keep full resolution in the first block, because
the device is largely a texture (speckle grain) cue that early striding erases.

Training is deterministic per seed (parameter init, shuffling and
augmentation all come from seeded generators) on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


# --------------------------------------------------------------------------- networks

def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Conv blocks (each conv-BN-ReLU then 2x max-pool), global average + max pooling, a linear head.

    `depth` blocks (default: enough to bring the image down to 2x2, e.g. 4 at
    32 px, 5 at 64 px) so that the last features see a whole lesion at any size.
    """

    def __init__(self, num_classes: int, width: int = 16, depth: int = 4):
        super().__init__()
        widths = [min(width * 2 ** k, 4 * width) for k in range(depth)]
        blocks, cin = [], 1
        for cout in widths:
            blocks += [_conv(cin, cout), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


class MiniUNet(nn.Module):
    """A 3-level UNet (two conv-BN-ReLU per level, skip connections) giving one lesion logit per pixel."""

    def __init__(self, width: int = 16):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = nn.Sequential(_conv(1, w1), _conv(w1, w1))
        self.enc2 = nn.Sequential(_conv(w1, w2), _conv(w2, w2))
        self.mid = nn.Sequential(_conv(w2, w3), _conv(w3, w3))
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = nn.Sequential(_conv(2 * w2, w2), _conv(w2, w2))
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = nn.Sequential(_conv(2 * w1, w1), _conv(w1, w1))
        self.out = nn.Conv2d(w1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)[:, 0]


# --------------------------------------------------------------------------- augmentation

def _augment(generator: torch.Generator, flip: bool, shift: int, *tensors: torch.Tensor,
             jitter: float = 0.0) -> list[torch.Tensor]:
    """The same random horizontal flip and integer shift (edge-replicated) for each (B, C, H, W) tensor;
    with `jitter` > 0 the first tensor (the image) also gets a random gain and offset of that scale.

    Only horizontal flips: ultrasound depth runs down the image, so a vertical
    flip would make an impossible image. `flip=False` for the device probe,
    whose overlay (tick side, text corner) is a left/right cue; likewise no
    intensity jitter there, since gain and dynamic range are device cues.
    """
    b = tensors[0].shape[0]
    if jitter > 0:
        gain = torch.exp(jitter * torch.randn(b, 1, 1, 1, generator=generator))
        offset = jitter * torch.randn(b, 1, 1, 1, generator=generator)
        tensors = (((tensors[0] + 1) * gain - 1 + offset).clamp(-1, 1), *tensors[1:])
    do_flip = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    dy, dx = (torch.randint(-shift, shift + 1, (2, b), generator=generator) if shift > 0
              else torch.zeros(2, b, dtype=torch.int64))
    out = []
    for t in tensors:
        t = torch.where(do_flip[:, None, None, None], t.flip(-1), t)
        if shift > 0:
            h, w = t.shape[-2:]
            padded = F.pad(t.float(), (shift,) * 4, mode="replicate").to(t.dtype)
            t = torch.stack([padded[i, :, shift + dy[i]: shift + dy[i] + h, shift + dx[i]: shift + dx[i] + w]
                             for i in range(b)])
        out.append(t)
    return out


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be a (N, 1, S, S) tensor in [-1, 1], got shape {tuple(images.shape)}")
    return images.float()


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    images = _check_images(images)
    if len(images) == 0:  # an empty batch still has the output's shape (0, ...)
        return model(images)
    return torch.cat([model(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    n_val = int(round(val_fraction * n))
    return order[n_val:], order[:n_val]


# --------------------------------------------------------------------------- classifier

@dataclass
class Probe:
    """A trained classifier; `classes[k]` names output k. `reference_accuracy` is its accuracy on held-out
    real images (set by whoever held them out): the ceiling a generated image can reach."""

    model: SmallCNN
    classes: tuple[str, ...]
    val_accuracy: float | None = None
    reference_accuracy: float | None = None
    batch_size: int = 256

    def predict_logits(self, images: torch.Tensor) -> np.ndarray:
        """(N, C) unnormalised class scores: unlike probabilities they do not saturate at 0 or 1."""
        return _predict(self.model, images, self.batch_size).numpy()

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """(N, C) class probabilities for (N, 1, S, S) images in [-1, 1]."""
        return _predict(self.model, images, self.batch_size).softmax(dim=1).numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.predict_proba(images).argmax(axis=1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 30, seed: int = 0,
                     val_fraction: float = 0.0, *, val: tuple[torch.Tensor, torch.Tensor] | None = None,
                     classes: Sequence[str] | None = None, flip: bool = True, shift: int = 2, width: int = 16,
                     jitter: float = 0.0, batch_size: int = 64, lr: float = 3e-3, balanced: bool = True,
                     progress: bool = True) -> Probe:
    """Train a SmallCNN on real images (N, 1, S, S) in [-1, 1] with integer labels 0..num_classes-1.

    Validation data (`val`, or a random `val_fraction` of the training images)
    selects the epoch whose weights are kept and gives `Probe.val_accuracy`.
    `balanced` weights the loss by inverse class frequency, so that a minority
    class (malignant, a rare device) is not simply never predicted.
    """
    images, labels = _check_images(images), torch.as_tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    if val is None and val_fraction > 0:
        train_idx, val_idx = _split(len(images), val_fraction, generator)
        val = (images[val_idx], labels[val_idx])
        images, labels = images[train_idx], labels[train_idx]
    torch.manual_seed(seed)
    depth = max(2, int(math.log2(images.shape[-1])) - 1)
    model = SmallCNN(num_classes, width, depth)
    counts = torch.bincount(labels, minlength=num_classes).float()
    weight = (counts.sum() / counts.clamp(min=1) / num_classes) if balanced else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(images) // batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    probe = Probe(model, tuple(classes) if classes is not None else tuple(str(k) for k in range(num_classes)))
    best_state, best_acc = None, -1.0
    for _ in (bar := tqdm(range(epochs), disable=not progress, desc="classifier", unit="epoch")):
        model.train()
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            (x,) = _augment(generator, flip, shift, images[batch], jitter=jitter)
            loss = F.cross_entropy(model(x), labels[batch], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if val is not None:
            acc = probe.accuracy(*val)
            if acc >= best_acc:
                best_acc, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
            bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
        probe.val_accuracy = best_acc
    model.eval()
    return probe


# --------------------------------------------------------------------------- segmenter

@dataclass
class Segmenter:
    """A trained lesion segmenter. `reference_dice` / `reference_box_hit`: its Dice and box-control hit rate
    on held-out real lesion images (set by whoever held them out)."""

    model: MiniUNet
    threshold: float = 0.5
    reference_dice: float | None = None
    reference_box_hit: float | None = None
    batch_size: int = 128

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        return _predict(self.model, images, self.batch_size)

    def predict_mask(self, images: torch.Tensor) -> np.ndarray:
        """(N, S, S) bool lesion masks for (N, 1, S, S) images in [-1, 1]."""
        return (self.predict_logits(images).sigmoid() > self.threshold).numpy()

    def dice(self, images: torch.Tensor, masks: torch.Tensor | np.ndarray) -> np.ndarray:
        """Per-image Dice of the predicted vs the given masks (1 when both are empty)."""
        return dice_score(self.predict_mask(images), np.asarray(masks, dtype=bool))


def dice_score(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image Dice 2|P∩T| / (|P|+|T|) of (N, S, S) bool masks; 1 when both are empty."""
    inter = (pred & true).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + true.sum(axis=(1, 2))
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, epochs: int = 30, seed: int = 0, *,
                    width: int = 16, batch_size: int = 32, lr: float = 3e-3, shift: int = 2,
                    progress: bool = True) -> Segmenter:
    """Train a MiniUNet on real images (N, 1, S, S) in [-1, 1] and their exact lesion masks (N, S, S).

    Loss = BCE + soft Dice: lesions cover a few percent of the image, and Dice
    keeps the net from settling on "no lesion anywhere". Include lesion-free
    images: they teach it not to invent lesions.
    """
    images = _check_images(images)
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.float32)[:, None]
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape[-2:])} x {masks.shape[0]} do not match images "
                         f"{tuple(images.shape[-2:])} x {images.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MiniUNet(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(images) // batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for _ in (bar := tqdm(range(epochs), disable=not progress, desc="segmenter", unit="epoch")):
        model.train()
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            x, y = _augment(generator, True, shift, images[batch], masks[batch])
            logits = model(x)
            y = y[:, 0]
            prob = logits.sigmoid()
            soft_dice = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, y) + soft_dice
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return Segmenter(model)
