"""Device augmentation (§4.3.2): one CycleGAN translator per target device, every image → every device.

BUSGen adapts its foundation model to a downstream task with few images,
often from few devices. So that the adapted model can still generate every
device, each adaptation image is translated to every device's style, "one
translator per target device": for target d, a CycleGAN between domain A =
train images of all other devices and domain B = train images of d. Only its
A→B generator is kept.

Their evaluation on the phantom, where the truth is known, lives in
`busgen_lib/evaluate/translation.py`.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from busgen_lib.atomic import atomic_path, write_text_atomic
from busgen_lib.data.dataset import derive_seed
from busgen_lib.data.manifest import resolve, write_manifest
from busgen_lib.devices.cyclegan import CycleGANConfig, ResnetGenerator, cyclegan_config, train_cyclegan
from busgen_lib.data.dataset import load_images

BATCH = 64  # images per translation batch


def device_slug(device: str) -> str:
    """A file-name-safe form of a device name ("Vendor-A L12-5" -> "Vendor-A_L12-5")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", device)


# --------------------------------------------------------------------------- translators

@dataclass
class Translator:
    """One trained translator: images of `source_devices` → the style of `device` (the kept A→B generator)."""

    device: str
    generator: ResnetGenerator
    config: CycleGANConfig
    source_devices: tuple[str, ...]
    seed: int
    train_seconds: float

    def save(self, folder: Path) -> None:
        """`<slug>.safetensors` (weights), then `<slug>.json` (device, image size, config): the JSON marks it done."""
        slug = device_slug(self.device)
        state = {k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}
        with atomic_path(folder / f"{slug}.safetensors") as tmp:
            save_file(state, tmp)
        meta = {"device": self.device, "image_size": self.config.image_size, "source_devices": list(self.source_devices),
                "seed": self.seed, "train_seconds": self.train_seconds, "config": asdict(self.config),
                "weights": f"{slug}.safetensors"}
        write_text_atomic(folder / f"{slug}.json", json.dumps(meta, indent=1))

    @classmethod
    def load(cls, meta_path: Path) -> Translator:
        meta = json.loads(meta_path.read_text())
        config = CycleGANConfig.from_dict(meta["config"])
        generator = ResnetGenerator(config.ngf, config.n_blocks)
        weights = meta_path.parent / meta["weights"]
        try:
            generator.load_state_dict(load_file(weights))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{weights} does not hold the generator described in {meta_path} "
                             f"(ngf {config.ngf}, {config.n_blocks} blocks): {err}") from None
        return cls(meta["device"], generator.eval(), config, tuple(meta["source_devices"]), int(meta["seed"]),
                   float(meta["train_seconds"]))


class DeviceTranslators:
    """The collection of per-target-device translators, all at one image size."""

    def __init__(self, translators: Sequence[Translator] = ()):
        self.translators: dict[str, Translator] = {}
        for translator in translators:
            self.add(translator)

    def add(self, translator: Translator) -> None:
        if self.translators and translator.config.image_size != self.image_size:
            raise ValueError(f"translator for {translator.device!r} works at {translator.config.image_size} px, "
                             f"the others at {self.image_size} px; all translators must share one image size")
        self.translators[translator.device] = translator

    @property
    def devices(self) -> list[str]:
        """Target devices, in the order they were added."""
        return list(self.translators)

    @property
    def image_size(self) -> int:
        if not self.translators:
            raise ValueError("no translators yet: fit or load some first")
        return next(iter(self.translators.values())).config.image_size

    @property
    def known_devices(self) -> set[str]:
        """Devices an image may come from: every target and every device a translator learnt from."""
        return set(self.translators).union(*(t.source_devices for t in self.translators.values()))

    # ------------------------------------------------------------------ training and files

    def fit(self, manifest_df: pd.DataFrame, devices: Sequence[str] | None = None, profile: str = "demo",
            seed: int = 0, out_dir: str | Path | None = None, *, config_overrides: dict | None = None,
            device: str | torch.device = "cpu", progress: bool = True) -> DeviceTranslators:
        """Train one translator per target device on the manifest's `train` split (all its devices by default).

        With `out_dir`, each finished translator is saved there at once and a
        rerun skips it, while an unfinished one resumes from its training
        checkpoint (`out_dir/training/<device>/`, removed once the translator
        is saved: at paper size it is ~0.3 GB per device). `out_dir` is then
        a folder `load` reads.
        """
        train = manifest_df[manifest_df["split"].astype(str) == "train"]
        train.attrs = dict(manifest_df.attrs)
        if train.empty:
            raise ValueError("the manifest has no rows with split == 'train' to train translators on")
        names = train["device"].astype(str).str.strip()
        present = sorted(set(names) - {"", "nan", "None"})
        targets = list(devices) if devices is not None else present
        missing = [d for d in targets if d not in present]
        if missing:
            raise ValueError(f"no train images of device(s) {missing}; the train split has: {', '.join(present)}")
        if len(present) < 2:
            raise ValueError("device translation needs train images of at least two devices")
        config = cyclegan_config(profile, **(config_overrides or {}))
        out = Path(out_dir) if out_dir is not None else None
        images = None  # loaded on the first translator that has to train
        for target in targets:
            sources = tuple(d for d in present if d != target)
            translator_seed = derive_seed(seed, zlib.crc32(target.encode()))
            done = out / f"{device_slug(target)}.json" if out is not None else None
            if done is not None and done.exists():
                translator = Translator.load(done)
                stored = {"config": translator.config, "seed": translator.seed, "sources": translator.source_devices}
                wanted = {"config": config, "seed": translator_seed, "sources": sources}
                differs = [k for k in stored if stored[k] != wanted[k]]
                if differs:
                    raise ValueError(f"{done} holds a translator for {target!r} trained with another "
                                     f"{', '.join(differs)}; use another out_dir or delete it")
                self.add(translator)
                continue
            if images is None:
                images = load_images(train, config.image_size, progress)
            is_target = torch.tensor((names == target).to_numpy())
            is_source = torch.tensor(names.isin(sources).to_numpy())
            training = out / "training" / device_slug(target) if out is not None else None
            if progress:
                tqdm.write(f"translator → {target}: {int(is_source.sum())} source, {int(is_target.sum())} target images")
            model = train_cyclegan(images[is_source], images[is_target], config, translator_seed, training,
                                   progress, device=device)
            translator = Translator(target, model.g_ab.cpu().eval(), config, sources, translator_seed,
                                    model.train_seconds)
            self.add(translator)
            if out is not None:
                translator.save(out)
                shutil.rmtree(training)
        return self

    def save(self, folder: str | Path) -> Path:
        """Write every translator as `<device>.safetensors` + `<device>.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for translator in self.translators.values():
            translator.save(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, image_size: int | None = None,
             devices: Sequence[str] | None = None) -> DeviceTranslators:
        """Read the translators of a folder; refuses another image size than `image_size` and absent `devices`."""
        folder = Path(folder)
        metas = sorted(folder.glob("*.json")) if folder.is_dir() else []
        metas = [m for m in metas if "device" in json.loads(m.read_text())]
        if not metas:
            raise FileNotFoundError(f"{folder}: no device translators (<device>.json + .safetensors); "
                                    "train them with DeviceTranslators.fit(..., out_dir=...)")
        translators = cls([Translator.load(m) for m in metas])
        if image_size is not None and translators.image_size != image_size:
            raise ValueError(f"{folder}: translators were trained at {translators.image_size} px, not {image_size} px; "
                             f"train translators at {image_size} px (the profile's image size)")
        absent = [d for d in (devices or []) if d not in translators.translators]
        if absent:
            raise ValueError(f"{folder}: no translator for device(s) {absent}; it has: "
                             f"{', '.join(translators.devices)}")
        return translators

    # ------------------------------------------------------------------ translation

    def _check(self, images: torch.Tensor, source_device: str | None = None) -> torch.Tensor:
        if source_device is not None and source_device not in self.known_devices:
            raise ValueError(f"unknown device {source_device!r}: these translators know "
                             f"{', '.join(sorted(self.known_devices))}")
        size = self.image_size
        if images.ndim not in (3, 4) or images.shape[-3] != 1 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"expected a (1, {size}, {size}) image or (N, 1, {size}, {size}) batch in [-1, 1] "
                             f"(the translators' image size), got shape {tuple(images.shape)}")
        return images.float()

    @torch.no_grad()
    def translate(self, images: torch.Tensor, target_device: str) -> torch.Tensor:
        """The images, of the translators' size and any known source device, in the style of `target_device`."""
        if target_device not in self.translators:
            raise ValueError(f"no translator for device {target_device!r}; targets: {', '.join(self.devices)}")
        images = self._check(images)
        batch = images if images.ndim == 4 else images[None]
        generator = self.translators[target_device].generator.eval()
        out = torch.cat([generator(batch[i: i + BATCH]) for i in range(0, len(batch), BATCH)])
        return out if images.ndim == 4 else out[0]

    def augment_devices(self, image: torch.Tensor, source_device: str) -> dict[str, torch.Tensor]:
        """Every device variant of an image (or a batch from one device): the source maps to the image itself.

        Keys are the target devices plus the source device; shapes are the input's.
        """
        image = self._check(image, source_device)
        variants = {d: (image if d == source_device else self.translate(image, d)) for d in self.devices}
        variants.setdefault(source_device, image)
        return variants


# --------------------------------------------------------------------------- augmented manifest

def _save_png(image: torch.Tensor, size: tuple[int, int], path: Path) -> None:
    """A (1, S, S) image in [-1, 1] resized to (H, W) and written as 8-bit grayscale."""
    image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def augment_manifest(df: pd.DataFrame, translators: DeviceTranslators, out_dir: str | Path,
                     progress: bool = True) -> pd.DataFrame:
    """Translate every row's image to every other target device; write PNGs and `out_dir/manifest.csv`.

    A copy keeps its row (boxes, mask, pathology, patient/exam/lesion ids,
    split, extra columns) with the new `device`, its `image`, and
    `source_image` / `source_device` naming the original. It is written at its
    source image's own size, so the source's mask still fits it pixel for
    pixel (the translation itself happens at the translators' size). These
    copies join the LoRA adaptation data (§4.3.2).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    df, attrs = df.reset_index(drop=True), dict(df.attrs)
    df.attrs = attrs
    size = translators.image_size
    rows: list[tuple[int, int, dict]] = []
    bar = tqdm(total=len(df), desc="device augmentation", unit="img", disable=not progress)
    for source, part in df.groupby(df["device"].astype(str), sort=False):
        positions = part.index.to_numpy()
        for start in range(0, len(positions), BATCH):
            chunk = df.iloc[positions[start: start + BATCH]]
            chunk.attrs = dict(df.attrs)
            variants = translators.augment_devices(load_images(chunk, size), source)
            for k, pos in enumerate(chunk.index):
                original = resolve(df, "image", pos)
                with Image.open(original) as im:
                    width, height = im.size
                for order, target in enumerate(translators.devices):
                    if target == source:
                        continue
                    path = out_dir / "images" / f"{pos:06d}_{original.stem}__{device_slug(target)}.png"
                    _save_png(variants[target][k], (height, width), path)
                    row = {**df.iloc[pos].to_dict(), "image": str(path.resolve()), "device": target,
                           "source_image": str(original.resolve()), "source_device": source}
                    rows.append((pos, order, row))
            bar.update(len(chunk))
    bar.close()
    rows.sort(key=lambda r: r[:2])
    out = pd.DataFrame([r[2] for r in rows], columns=[*df.columns, "source_image", "source_device"])
    out.attrs = dict(df.attrs)
    write_manifest(out, out_dir / "manifest.csv")
    return out
