"""The torch Dataset that feeds pretraining and adaptation (§4.3.1–4.3.2), and class-balanced resampling.

A sample carries the three conditions of the reference code: pathology and device
as integer indices with 0 reserved for the null (unconditional / unknown) token,
used by classifier-free guidance, and the lesion boxes both as padded
coordinates and as a binary box-mask channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from busgen_lib.data.augment import AugmentConfig, augment, prepare
from busgen_lib.data.manifest import not_a_regular_file, resolve
from busgen_lib.data.pixels import unit_grayscale
from busgen_lib.data.schema import BIRADS_CLASSES, PATHOLOGIES, parse_boxes
from busgen_lib.errors import DataError

NULL_INDEX = 0  # the null token of every categorical condition (CFG's unconditional class)
PATHOLOGY_INDEX: dict[str, int] = {p: i + 1 for i, p in enumerate(PATHOLOGIES)}
BIRADS_INDEX: dict[str, int] = {b: i + 1 for i, b in enumerate(BIRADS_CLASSES)}  # CoLDiT's condition (0 = null)


# --------------------------------------------------------------------------- helpers

def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, epoch, index).

    Deriving per-sample seeds (instead of drawing from one shared stream) makes a
    sample's augmentation independent of worker count, order and resumption.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def boxes_to_mask(boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Rasterise relative boxes (..., N, 4) into a float mask (..., H, W): 1 inside any box.

    Pixel (r, c) is inside [x0, y0, x1, y1] when its centre ((c + 0.5) / W, (r + 0.5) / H)
    lies in [x0, x1) x [y0, y1): the pixel-exact rule that samplers reuse, so the box
    channel at training and at sampling time agree. All-zero padding boxes are empty.
    """
    height, width = (size, size) if isinstance(size, int) else size
    cy = (torch.arange(height, dtype=torch.float32, device=boxes.device) + 0.5) / height
    cx = (torch.arange(width, dtype=torch.float32, device=boxes.device) + 0.5) / width
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    inside_y = (cy >= y0) & (cy < y1)  # (..., N, H)
    inside_x = (cx >= x0) & (cx < x1)  # (..., N, W)
    return (inside_y[..., :, None] & inside_x[..., None, :]).any(dim=-3).to(torch.float32)


def load_grayscale(path: str | Path) -> torch.Tensor:
    """Read an image file as a (1, H, W) float32 tensor in [0, 1] (the pixel rule of data/pixels.py).

    8-bit, palette and colour images become ITU-R 601-2 luma / 255, 16-bit ones
    / 65535, float ones are taken as they are if in 0..1; any other range, a
    truncated file or a non-regular file is a DataError naming the file.
    """
    path = Path(path)
    if (why := not_a_regular_file(path)) is not None:
        raise DataError(why)
    try:
        with Image.open(path) as im:
            im.load()
            array = unit_grayscale(im, str(path))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read {path} as an image ({err}); re-export it, e.g. as PNG") from err
    return torch.from_numpy(array)[None]


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def keep_largest(boxes: torch.Tensor, max_boxes: int) -> torch.Tensor:
    """The `max_boxes` largest boxes by area, largest first (ties keep manifest order).

    Larger lesions dominate the image, so they are the conditions worth keeping when
    an image has more lesions than the model has box slots.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.sort(area, descending=True, stable=True).indices
    return boxes[order[:max_boxes]]


# --------------------------------------------------------------------------- dataset

class BUSDataset(Dataset):
    """Manifest rows → dicts of image in [-1, 1] (the diffusion convention) and its conditions.

    `train=True` applies `augment` with randomness derived from (seed, epoch, index):
    DataLoader workers and resumed runs see the same augmentation. Call
    `set_epoch` before each epoch; it reaches workers because non-persistent
    workers copy the dataset when an epoch's iteration starts (with
    `persistent_workers=True` it would not).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        root: str | Path | None = None,
        image_size: int = 64,
        train: bool = False,
        max_boxes: int = 4,
        device_vocab: Sequence[str] | None = None,
        augment_config: AugmentConfig | None = None,
        seed: int = 0,
        birads: bool = False,
    ) -> None:
        root = root if root is not None else df.attrs.get("root")
        if root is None:
            raise ValueError("no image root: pass root=... or set df.attrs['root'] to the manifest's folder")
        # Manifest row numbers (1-based, as `validate` counts) of the rows kept, for messages.
        self._manifest_rows = [int(i) + 1 for i in df.index] if pd.api.types.is_integer_dtype(df.index) \
            else list(range(1, len(df) + 1))
        self.df = df.reset_index(drop=True)
        self.root = Path(root)
        self.image_size, self.train, self.max_boxes, self.seed = image_size, train, max_boxes, seed
        self.augment_config = augment_config or AugmentConfig()
        self.device_vocab: tuple[str, ...] = tuple(
            device_vocab if device_vocab is not None
            else sorted({str(d) for d in df["device"] if not _is_empty(d)})
        )
        self.epoch = 0
        self._pathology = [self._pathology_index(i, p) for i, p in enumerate(self.df["pathology"])]
        self._device = [self._device_index(i, d) for i, d in enumerate(self.df["device"])]
        # With `birads`, items carry the BI-RADS class (CoLDiT's condition); every row must have one of BIRADS_CLASSES.
        self._birads = [self._birads_index(i, b) for i, b in enumerate(self.df["birads"])] if birads else None

    def _pathology_index(self, row: int, name: object) -> int:
        try:
            return PATHOLOGY_INDEX[str(name)]
        except KeyError:
            raise DataError(f"{self._where(row)}: pathology {name!r} is not one of "
                            f"{', '.join(PATHOLOGIES)}") from None

    def _device_index(self, row: int, name: object) -> int:
        """0 for an empty device, else 1 + position in the vocabulary; an unknown name is an error,
        since silently mapping it to the null token would train a real device as 'unknown'."""
        if _is_empty(name):
            return NULL_INDEX
        if str(name) not in self.device_vocab:
            raise DataError(f"{self._where(row)}: device {name!r} is not one the model knows "
                            f"({', '.join(self.device_vocab) or 'none'}); use one of them or leave device empty")
        return self.device_vocab.index(str(name)) + 1

    def _birads_index(self, row: int, value: object) -> int:
        name = "" if _is_empty(value) else str(value).strip().lower()
        if name not in BIRADS_INDEX:
            raise DataError(f"{self._where(row)}: birads {value!r} is not one of the generated categories "
                            f"{', '.join(BIRADS_CLASSES)}; keep only such rows to train a BI-RADS-conditioned model")
        return BIRADS_INDEX[name]

    def _where(self, position: int) -> str:
        return f"row {self._manifest_rows[position]} ({self.df['image'][position]})"

    def class_labels(self) -> list[str]:
        """What class-balanced resampling balances: the BI-RADS class when items carry it, else the pathology."""
        return self.df["birads" if self._birads is not None else "pathology"].astype(str).str.lower().tolist()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of this epoch (the same epoch always gives the same samples)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        row = self.df.iloc[index]
        image = load_grayscale(self.root / row["image"])
        boxes = torch.tensor(parse_boxes(row["boxes"]), dtype=torch.float32).reshape(-1, 4)
        if self.train:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
            image, boxes = augment(image, boxes, self.image_size, self.augment_config, generator)
        else:
            image, boxes = prepare(image, boxes, self.image_size)
        # Truncating after the crop keeps every lesion whole; crops scale all areas alike, so the kept set is the same.
        boxes = keep_largest(boxes, self.max_boxes)
        padded = torch.zeros(self.max_boxes, 4)
        padded[: len(boxes)] = boxes
        valid = torch.arange(self.max_boxes) < len(boxes)
        item = {
            "image": image * 2.0 - 1.0,
            "pathology": torch.tensor(self._pathology[index], dtype=torch.int64),
            "device": torch.tensor(self._device[index], dtype=torch.int64),
            "boxes": padded,
            "box_valid": valid,
            "box_mask": boxes_to_mask(boxes, self.image_size)[None],
            "index": index,
        }
        if self._birads is not None:
            item["birads"] = torch.tensor(self._birads[index], dtype=torch.int64)
        return item


# --------------------------------------------------------------------------- class-balanced resampling

class ClassBalancedSampler(WeightedRandomSampler):
    """Draws `num_samples` indices with replacement, each class equally likely in expectation.

    Weights are 1 / (count of the row's class). The generator is re-seeded from
    (seed, epoch) at every iteration, so an epoch's draw is reproducible after a
    resume; call `set_epoch` for a new draw, as with DistributedSampler.
    """

    def __init__(self, labels: Sequence[object], num_samples: int | None = None, seed: int = 0, epoch: int = 0):
        labels = pd.Series(list(labels))
        weights = 1.0 / labels.map(labels.value_counts()).to_numpy(dtype=np.float64)
        super().__init__(weights.tolist(), num_samples or len(labels), replacement=True, generator=torch.Generator())
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(derive_seed(self.seed, self.epoch))
        return super().__iter__()


def class_balanced_sampler(source: pd.DataFrame | BUSDataset, epoch: int = 0, seed: int = 0) -> ClassBalancedSampler:
    """The per-epoch class-balanced resampling of pretraining: len(source) draws balanced over pathology."""
    df = source.df if isinstance(source, BUSDataset) else source
    return ClassBalancedSampler(df["pathology"].astype(str).tolist(), seed=seed, epoch=epoch)


# --------------------------------------------------------------------------- whole tables in memory

def load_images(df: pd.DataFrame, size: int, progress: bool = False) -> torch.Tensor:
    """(N, 1, size, size) images in [-1, 1] of a manifest's rows, through the data layer without augmentation."""
    dataset = BUSDataset(df, image_size=size, train=False)
    return torch.stack([dataset[i]["image"] for i in tqdm(range(len(dataset)), disable=not progress,
                                                           desc="load", unit="img")])


def load_masks(df: pd.DataFrame, size: int) -> torch.Tensor:
    """(N, size, size) bool lesion masks: the `mask` file where a row has one, else its filled boxes.

    Masks are resized like the images (whole image, antialiased) and thresholded
    at one half. Rows without a mask fall back to their box rectangles, a coarser
    target, so that datasets with boxes only can still train a segmenter.
    """
    has_mask = "mask" in df.columns
    out = []
    for i in range(len(df)):
        if has_mask and str(df["mask"].iloc[i]).strip() not in ("", "nan", "None"):
            mask = load_grayscale(resolve(df, "mask", i))[None]
            mask = torch.nn.functional.interpolate(mask, size=(size, size), mode="bilinear", antialias=True)[0, 0]
            out.append(mask > 0.5)
        else:
            out.append(boxes_to_mask(torch.tensor(parse_boxes(df["boxes"].iloc[i]), dtype=torch.float32).reshape(-1, 4), size) > 0)
    return torch.stack(out)
