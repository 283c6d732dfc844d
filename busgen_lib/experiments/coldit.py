"""The CoLDiT study on one manifest with BI-RADS (notebook 09): autoencoder fidelity, BI-RADS control, the
replacement experiment, and CoLDiT beside BUSGen's pixel UNet at the same data and training FLOPs.

Joins `diffusion.train.pretrain` (both backbones, one loop), `diffusion.pipeline` (sampling into manifests),
`experiments.realism.realism_study` (privacy and realism, as notebook 04 measures BUSGen), `evaluate.probes`
(the small real-data classifiers that stand in for the study's radiologists and its BI-RADS model) and
`evaluate.stats` (Wilson and DeLong CIs, DeLong's test).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from busgen_lib.data.dataset import load_images
from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.data.schema import BIRADS_CLASSES, BIRADS_PATHOLOGY
from busgen_lib.diffusion import pipeline
from busgen_lib.diffusion.checkpoint import load_coldit, load_generator
from busgen_lib.diffusion.coldit import build_coldit, vae_loss
from busgen_lib.diffusion.generate import read_plan
from busgen_lib.diffusion.model import BUSGenUNet, config_for_profile
from busgen_lib.diffusion.train import LossFn, birads_rows, diffusion_objective, train_config, train_dataset
from busgen_lib.evaluate.probes import Probe, train_classifier
from busgen_lib.evaluate.stats import bootstrap_ci, delong_ci, delong_test, proportion_ci
from busgen_lib.profiles import get_coldit

HIGH = ("4c", "5")  # the replacement experiment's positive class: malignancy more likely than not (ACR)
REAL, HALF = "real", "half real + half CoLDiT"
SSIM_BORDER = 5  # half of SSIM's 11-px Gaussian window (σ = 1.5)


def birads_manifest(manifest: str | Path, out: str | Path) -> Path:
    """The rows of the five generated BI-RADS categories, all splits (CoLDiT's data, and the UNet's beside it)."""
    return write_manifest(birads_rows(read_manifest(manifest), manifest), Path(out) / "manifest.csv")


@dataclass
class ComputeBudget:
    """Training FLOPs of CoLDiT's two stages and the UNet steps that spend the same: the side-by-side's budget."""

    table: pd.DataFrame  # one row per trained network: steps, batch, GFLOP per step, TFLOP in all
    unet_steps: int


def step_flops(model: torch.nn.Module, loss_fn: LossFn, batch: dict[str, torch.Tensor]) -> int:
    """Forward + backward FLOPs of one training step (torch's `FlopCounterMode`: matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def batch_flops(model: torch.nn.Module, loss_fn: LossFn, dataset, batch_size: int) -> int:
    """`step_flops` on the first batch of `dataset` (its tensors; names and paths stay out)."""
    batch = next(iter(DataLoader(dataset, batch_size=batch_size)))
    return step_flops(model, loss_fn, {k: v for k, v in batch.items() if torch.is_tensor(v)})


def unet_step_flops(df: pd.DataFrame, profile: str, **model_overrides: Any) -> int:
    """Training FLOPs of one BUSGen UNet step under `profile` (with `pretrain`'s `model_overrides`), on a batch of
    `df` as `pretrain` builds it."""
    config = train_config(profile)
    dataset = train_dataset(df, profile, config, image_size=model_overrides.get("image_size"))[0]
    unet = BUSGenUNet(**config_for_profile(profile, dataset.device_vocab, **model_overrides)).train()
    return batch_flops(unet, diffusion_objective(unet), dataset, config.batch_size)


def compute_budget(manifest: str | Path, profile: str) -> ComputeBudget:
    """The UNet training steps whose FLOPs equal CoLDiT's autoencoder + DiT stages under `profile`, each network
    counted on a real batch of the manifest as `pretrain` builds it (freshly initialised: FLOPs do not depend on
    the weights). FLOPs, not seconds: the same on every machine, and a resumed run keeps its budget. On the demo
    CPU they track seconds closely (≈70 GFLOP/s for all three networks on one thread)."""
    s, df = get_coldit(profile), read_manifest(manifest)
    coldit_model = build_coldit(profile).train()
    rows = []

    def count(network: str, config, flops: int) -> None:
        rows.append({"network": network, "steps": config.steps, "batch": config.batch_size, "GFLOP/step": flops / 1e9})

    for network, overrides, frozen, loss_fn in (
            ("CoLDiT autoencoder", s.vae_train, coldit_model.dit,
             lambda m, b: vae_loss(m, b, coldit_model.config.kl_weight)),
            ("CoLDiT DiT", s.dit_train, coldit_model.vae, diffusion_objective(coldit_model))):
        config = train_config(profile, **overrides)
        coldit_model.requires_grad_(True)
        frozen.requires_grad_(False)  # as in `pretrain`: one stage trains, the other network is frozen
        dataset = train_dataset(df, profile, config, birads=True)[0]
        count(network, config, batch_flops(coldit_model, loss_fn, dataset, config.batch_size))
    count("BUSGen UNet", train_config(profile), unet_step_flops(df, profile))
    table = pd.DataFrame(rows)
    coldit_flops = (table["steps"] * table["GFLOP/step"]).iloc[:2].sum()
    unet_steps = math.ceil(coldit_flops / table["GFLOP/step"].iloc[2])
    table.loc[2, "steps"] = unet_steps
    table["TFLOP"] = table["steps"] * table["GFLOP/step"] / 1e3
    return ComputeBudget(table, unet_steps)


# --------------------------------------------------------------------------- the autoencoder

def reconstruction(model_dir: str | Path, manifest: str | Path, split: str = "test", n_boot: int = 1000
                   ) -> pd.DataFrame:
    """PSNR (dB) and SSIM of E→D reconstructions of the `split` images (unseen by the autoencoder), with
    bootstrap CIs of the mean; images in [0, 1] (torchmetrics)."""
    model = load_coldit(model_dir).eval()
    df = read_manifest(manifest)
    rows = df[df["split"] == split]
    x = load_images(rows, model.config.image_size)
    with torch.no_grad():
        recon = model.decode(model.encode_latents(x))
    a, b = ((recon + 1) / 2).double(), ((x + 1) / 2).double()  # float64: SSIM's E[x²] − E[x]² cancels in float32
    # SSIM as Wang et al. (and skimage) average it: over the pixels whose 11-px window lies inside the image;
    # torchmetrics' own mean also counts the border pixels it computes on reflect-padded images.
    _, ssim_map = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
    per_image = {"PSNR (dB)": peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)),
                 "SSIM": ssim_map[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER].mean(dim=(1, 2, 3))}
    out = []
    for name, values in per_image.items():
        mean, lo, hi = bootstrap_ci(np.mean, values.numpy(), n_boot=n_boot)
        out.append({"metric": name, "n": len(rows), "mean": mean, "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- conditioning control

def label_probe(manifest: str | Path, column: str, classes: tuple[str, ...], size: int, epochs: int,
                seed: int = 0) -> Probe:
    """A SmallCNN trained on the real `train` rows to read `column` (BI-RADS or pathology): the judge of control."""
    df = read_manifest(manifest)
    train = df[df["split"] == "train"]
    labels = torch.tensor([classes.index(str(v).lower()) for v in train[column]])
    return train_classifier(load_images(train, size), labels, len(classes), epochs=epochs, seed=seed,
                            classes=classes, progress=False)


def control_row(name: str, probe: Probe, frame: pd.DataFrame, column: str, size: int) -> dict:
    """How often the judge reads the requested (generated) or true (real) `column` value, with a Wilson CI."""
    classes = list(probe.classes)
    truth = np.array([classes.index(str(v).lower()) for v in frame[column]])
    correct = int((probe.predict(load_images(frame, size)) == truth).sum())
    rate, lo, hi = proportion_ci(correct, len(frame))
    return {"images": name, "judged": column, "n": len(frame), "accuracy": rate, "ci_lo": lo, "ci_hi": hi,
            "chance": 1 / len(classes)}


# --------------------------------------------------------------------------- the replacement experiment

@dataclass
class Replacement:
    """AUC of each arm on the real test images (DeLong CI), and DeLong's test of the difference."""

    table: pd.DataFrame
    p_value: float
    n_test: int


def high_suspicion(frame: pd.DataFrame) -> np.ndarray:
    """1 where BI-RADS is 4c or 5 (malignancy more likely than not), else 0: the replacement model's target."""
    return np.isin(frame["birads"].astype(str).str.lower(), HIGH).astype(int)


def replacement(manifest: str | Path, generated: pd.DataFrame, size: int, epochs: int, seed: int = 0
                ) -> Replacement:
    """The study's Fig 4: a BI-RADS model (here: 4c/5 vs 3/4a/4b) trained on the real training images vs on as
    many images, half of them real (a random half) and half CoLDiT's, both tested on the real test split."""
    df = read_manifest(manifest)
    train, test = df[df["split"] == "train"], df[df["split"] == "test"]
    half, need = len(train) // 2, len(train) - len(train) // 2
    if len(generated) < need:
        raise ValueError(f"the replacement needs {need} generated images, got {len(generated)}")
    kept = np.sort(np.random.default_rng(seed).choice(len(train), half, replace=False))
    real_x, real_y = load_images(train, size), torch.tensor(high_suspicion(train))
    gen = generated.iloc[:need]
    arms = {REAL: (real_x, real_y),
            HALF: (torch.cat([real_x[kept], load_images(gen, size)]),
                   torch.cat([real_y[kept], torch.tensor(high_suspicion(gen))]))}
    y, x_test, scores, rows = high_suspicion(test), load_images(test, size), {}, []
    for name, (x, labels) in arms.items():
        probe = train_classifier(x, labels, 2, epochs=epochs, seed=seed, progress=False)
        scores[name] = probe.predict_proba(x_test)[:, 1]
        auc, lo, hi = delong_ci(y, scores[name])
        rows.append({"arm": name, "n_train": len(x), "auc": auc, "ci_lo": lo, "ci_hi": hi})
    _, _, _, p = delong_test(y, scores[REAL], scores[HALF], degenerate="permutation")
    return Replacement(pd.DataFrame(rows), p, len(test))


# --------------------------------------------------------------------------- speed

def images_per_second(model_dir: str | Path, sample_dir: str | Path, n: int, batch_size: int = 16,
                      **sampling) -> float:
    """Generation throughput on this machine: the first `n` requests of a sampled folder's plan, redrawn."""
    model = load_generator(model_dir).eval()
    requests = read_plan(sample_dir)[:n]
    start = time.perf_counter()
    pipeline.sample_images(model, requests, batch_size=batch_size, progress=False, **sampling)
    return len(requests) / (time.perf_counter() - start)


def birads_grid_images(frame: pd.DataFrame, per_class: int) -> dict[tuple[str, str], np.ndarray]:
    """{(BI-RADS row label, k): stored uint8 pixels} of the first `per_class` generated images per category."""
    root, cells = Path(frame.attrs["root"]), {}
    for b in BIRADS_CLASSES:
        for k, image in enumerate(frame.loc[frame["birads"].astype(str) == b, "image"].head(per_class)):
            cells[(grid_row(b), str(k + 1))] = np.asarray(Image.open(root / image))
    return cells


def grid_row(birads: str) -> str:
    return f"BI-RADS {birads}\n{BIRADS_PATHOLOGY[birads]}"


STUDY_READERS_AUC = (0.53, 0.63)  # the CoLDiT study's real-vs-generated reader AUCs (five of six readers)


def side_by_side_figure(side_by_side: pd.DataFrame) -> plt.Figure:
    """Fréchet distance, two-sample AUC (bootstrap CI bars) and images/s per dataset, CoLDiT beside the UNet."""
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.4))
    for ax, column, label in zip(axes, ["frechet_distance", "two_sample_auc", "images_per_s"],
                                 ["Fréchet distance (lower better)", "real-vs-generated AUC (0.5 best)", "images / s"]):
        pivot = side_by_side.pivot(index="data", columns="model", values=column)
        error = None
        if column == "two_sample_auc":  # bootstrap 95% CIs as asymmetric error bars
            lo, hi = (side_by_side.pivot(index="data", columns="model", values=c) for c in ("auc_ci_lo", "auc_ci_hi"))
            error = [[(pivot - lo)[m].values, (hi - pivot)[m].values] for m in pivot.columns]
        pivot.plot.bar(ax=ax, rot=0, legend=ax is axes[0], yerr=error, capsize=2)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("")
    axes[1].axhspan(*STUDY_READERS_AUC, color="#f0c000", alpha=0.3, label="study readers (5 of 6)")
    axes[1].legend(fontsize=6)
    return fig
