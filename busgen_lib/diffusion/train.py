"""Pretraining BUSGen (§4.3.1): one loop for one CPU, one GPU, or many GPUs/nodes via `accelerate`.

Everything random is derived from (seed, step, process) or (seed, epoch), never
from how long the process has been running, so `--resume` from a checkpoint
reaches the same weights as an uninterrupted run, and every data-parallel
replica stays identical (DDP averages the gradients).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from diffusers.utils import CONFIG_NAME
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from busgen_lib.data.augment import get_augmentation
from busgen_lib.data.dataset import BUSDataset, ClassBalancedSampler, derive_seed, load_images
from busgen_lib.data.manifest import read_manifest
from busgen_lib.data.schema import BIRADS_CLASSES
from busgen_lib.diffusion.box_prior import BoxPrior
from busgen_lib.diffusion.checkpoint import (latest_checkpoint, load_checkpoint, load_coldit, save_checkpoint,
                                             save_model)
from busgen_lib.diffusion.coldit import build_coldit, set_latent_scale, vae_loss
from busgen_lib.diffusion.model import BUSGenUNet, config_for_profile, model_settings
from busgen_lib.diffusion.schedule import UNET_CONDITIONS, ddpm_scheduler, diffusion_loss
from busgen_lib.errors import DataError, UsageError
from busgen_lib.profiles import PRETRAIN, get_coldit, get_profile

BACKBONES = ("unet", "dit")  # BUSGen's pixel UNet, CoLDiT's latent DiT
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]

BOX_PRIOR_FILE = "box_prior.json"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults per profile in profiles.PRETRAIN (reference: no EMA)."""

    steps: int
    batch_size: int                 # global batch, split evenly over processes
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float | None = None  # e.g. 0.999; None = no EMA
    checkpoint_every: int = 500
    log_every: int = 10
    mixed_precision: str = "bf16"   # used on GPUs only; CPU runs stay in fp32
    balanced: bool = True           # class-balanced resampling per epoch
    augment: str = "device"         # data/augment.py AUGMENTATIONS: "device" (pretraining) or "strong" (adaptation)
    seed: int = 0




def train_config(profile: str, **overrides: Any) -> TrainConfig:
    config = TrainConfig(**PRETRAIN[get_profile(profile).name])
    return check_train_config(replace(config, **overrides) if overrides else config)


def check_train_config(config: TrainConfig) -> TrainConfig:
    """Refuse step and batch counts that would save an untrained model or never step."""
    for option, value in (("--steps", config.steps), ("--batch-size", config.batch_size)):
        if int(value) != value or value < 1:
            raise UsageError(f"{option} must be a whole number >= 1, got {value}")
    return config


RUN_FILE = "run.json"  # the settings a run folder was started with; --resume must repeat them


def check_run_settings(out: Path, settings: dict[str, Any], resume: bool, write: bool = True) -> None:
    """Record a fresh run's settings in `out/run.json`; refuse a resume whose settings differ, naming each.

    Resuming with another batch size, step count or manifest would continue the
    optimiser on another problem while the checkpoint claims an exact resume.
    """
    path = out / RUN_FILE
    given = json.loads(json.dumps(settings))  # the JSON form, as stored
    if resume and path.exists():
        stored = json.loads(path.read_text())
        diffs = [f"{k} (run {stored.get(k)!r}, given {given.get(k)!r})"
                 for k in sorted(set(stored) | set(given)) if stored.get(k) != given.get(k)]
        if diffs:
            raise UsageError(f"{out}: --resume with other settings than the run was started with: "
                             f"{'; '.join(diffs)}; repeat the original options or choose another --out")
        return
    if write:  # the main process; the others only check
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(given, indent=1, sort_keys=True))


def fit_box_prior(train_df: pd.DataFrame, source: str | Path) -> BoxPrior:
    """The box prior of the training rows, fitted *before* training so that a manifest without lesion boxes
    fails at once instead of after the last step (sampling needs the prior to place lesions)."""
    try:
        return BoxPrior.fit(train_df)
    except ValueError:
        counts = train_df["pathology"].value_counts().to_dict()
        raise DataError(f"{source}: the train split has no benign or malignant rows with boxes "
                        f"({len(train_df)} train rows: {counts}); the model needs lesion boxes to learn where "
                        "lesions go and to place them when sampling; add boxed lesion rows to the train split") from None


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file (the manifest a run trains on)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- data order

def epoch_batches(dataset: BUSDataset, epoch: int, config: TrainConfig) -> list[list[int]]:
    """The global batches of one epoch: class-balanced (or plain shuffled) indices cut into full batches."""
    n = max(len(dataset), config.batch_size)
    if config.balanced:
        order = list(ClassBalancedSampler(dataset.class_labels(), num_samples=n,
                                          seed=config.seed, epoch=epoch))
    else:
        g = torch.Generator().manual_seed(derive_seed(config.seed, epoch))
        order = torch.randint(len(dataset), (n,), generator=g).tolist() if n > len(dataset) else \
            torch.randperm(len(dataset), generator=g).tolist()
    return [order[i:i + config.batch_size] for i in range(0, n - config.batch_size + 1, config.batch_size)]


def _loader(dataset: BUSDataset, batches: list[list[int]], rank: int, world: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=[b[rank::world] for b in batches], num_workers=workers)


# --------------------------------------------------------------------------- logging

class LossLog:
    """loss.csv (always) and TensorBoard (when installed); rows past a resumed step are dropped."""

    FIELDS = ("step", "epoch", "loss", "lr", "images_per_s")

    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / "loss.csv"
        rows = []
        if self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(run_dir / "tensorboard", purge_step=start_step + 1)
        except ImportError:
            self.tensorboard = None

    def write(self, **row: float) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", row["loss"], row["step"])
            self.tensorboard.add_scalar("lr", row["lr"], row["step"])


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all weights in a fixed order: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the loop

class StepCounter:
    """The optimisation step as a stateful object, so that accelerate's checkpoints carry it."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def make_accelerator(config: TrainConfig) -> Accelerator:
    """One CPU process, one GPU (bf16) or an `accelerate launch` group of processes."""
    gpu = torch.cuda.is_available()
    # Without a GPU, `cpu=True` makes a torchrun/`accelerate launch --multi_gpu` start use gloo across CPU processes.
    accelerator = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu and config.mixed_precision == "bf16" else "no")
    if config.batch_size % accelerator.num_processes:
        raise UsageError(f"--batch-size {config.batch_size} is not divisible by the {accelerator.num_processes} "
                         "processes; choose a multiple")
    return accelerator


def train_dataset(df: pd.DataFrame, profile: str, config: TrainConfig, device_vocab: tuple[str, ...] | None = None,
                  source: str | Path = "manifest", birads: bool = False, image_size: int | None = None
                  ) -> tuple[BUSDataset, pd.DataFrame]:
    """The augmented training dataset of a manifest's `train` split (pretraining and adaptation alike), at
    `image_size` (default the profile's: a model trained at another resolution passes its own)."""
    train_df = df[df["split"] == "train"]
    if train_df.empty:
        raise DataError(f"{source}: no rows with split = train to train on ({len(df)} rows in all); mark the "
                        "images to train on as train in the split column")
    prof = get_profile(profile)
    dataset = BUSDataset(train_df, root=df.attrs["root"], image_size=image_size or prof.image_size, train=True,
                         max_boxes=prof.max_boxes, seed=config.seed, device_vocab=device_vocab,
                         augment_config=get_augmentation(config.augment), birads=birads)
    return dataset, train_df


def diffusion_objective(net: torch.nn.Module) -> LossFn:
    """Eq. 1 for `net`: in pixels (BUSGen) or in its latents (CoLDiT, which has `encode_latents`)."""
    scheduler = ddpm_scheduler(net.config)
    conditions = getattr(net, "condition_keys", UNET_CONDITIONS)
    encode = getattr(net, "encode_latents", None)
    return lambda model, batch: diffusion_loss(model, batch, scheduler=scheduler, offset_noise=net.config.offset_noise,
                                               conditions=conditions, encode=encode)


def fit(model: torch.nn.Module, dataset: BUSDataset, config: TrainConfig, out: Path, accelerator: Accelerator, *,
        resume: bool, progress: bool = True, desc: str = "pretrain", loss_fn: LossFn | None = None
        ) -> torch.nn.Module:
    """The optimisation loop shared by pretraining, LoRA adaptation and CoLDiT's two stages; returns the unwrapped
    trained network.

    Only parameters with `requires_grad` are optimised (all of them when
    pretraining, the adapters when adapting, the autoencoder then the DiT for
    CoLDiT). `loss_fn(model, batch)` defaults to eq. 1 (`diffusion_objective`).
    `out` receives `checkpoints/`, `loss.csv` and one `replica-<rank>.sha256` per process.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    # The LR schedule is stepped by hand once per optimisation step, so it is not given to `prepare`
    # (which would step it once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay else None
    counter = StepCounter()
    # accelerate's save_state/load_state then carry them beside the model, optimizer and RNG states.
    accelerator.register_for_checkpointing(lr_scheduler, counter, *([ema] if ema is not None else []))
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        load_checkpoint(accelerator, ckpt)
    if ema is not None:
        ema.to(accelerator.device)  # load_state restores registered objects on the CPU
    step = counter.step
    loss_fn = loss_fn or diffusion_objective(net)
    out.mkdir(parents=True, exist_ok=True)
    log = LossLog(out, step) if accelerator.is_main_process else None
    workers = get_profile(net.config.profile).num_workers

    steps_per_epoch = max(len(dataset), config.batch_size) // config.batch_size
    bar = tqdm(total=config.steps, initial=step, desc=desc, disable=not (progress and accelerator.is_main_process))
    tick = time.perf_counter()
    while step < config.steps:
        epoch, offset = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        batches = epoch_batches(dataset, epoch, config)[offset:]
        for batch in _loader(dataset, batches, rank, world, workers):
            batch = {k: v.to(accelerator.device) for k, v in batch.items() if torch.is_tensor(v)}
            torch.manual_seed(derive_seed(config.seed, step, rank))  # noise, t and condition dropout of this step
            model.train()
            with accelerator.autocast():
                loss = loss_fn(model, batch)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(trainable)
            step += 1
            counter.step = step
            bar.update(1)
            mean_loss = accelerator.reduce(loss.detach(), "mean").item()
            if log is not None and (step % config.log_every == 0 or step == config.steps):
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                log.write(step=step, epoch=epoch, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0],
                          images_per_s=config.batch_size * config.log_every / max(elapsed, 1e-9))
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(accelerator, out, step)
            if step >= config.steps:
                break
    bar.close()
    (out / f"replica-{rank}.sha256").write_text(weights_digest(net))
    if ema is not None:
        ema.copy_to(trainable)  # the exported weights are the averaged ones
    return net


def finished(out: Path, steps: int) -> bool:
    """Whether the run in `out` checkpointed its last step (the final step is always checkpointed)."""
    latest = latest_checkpoint(out)
    return latest is not None and int(latest.name.split("-")[-1]) >= steps


def refuse_overwrite(out: Path, resume: bool) -> None:
    if not resume and latest_checkpoint(out) is not None:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it "
                         f"or choose another --out")


def pretrain(manifest: str | Path, profile: str, out: str | Path, *, resume: bool = False,
             train_overrides: dict[str, Any] | None = None, model_overrides: dict[str, Any] | None = None,
             progress: bool = True, backbone: str = "unet") -> Path:
    """Train a BUSGen model (or with backbone "dit" a CoLDiT) on the manifest's `train` split; returns the model
    folder `out/model`.

    `out` also holds `checkpoints/` (every `checkpoint_every` steps, atomic),
    `loss.csv`, and one `replica-<rank>.sha256` per process (identical under
    data parallelism). A second call without `resume` refuses to overwrite.
    """
    if backbone not in BACKBONES:
        raise UsageError(f"unknown --backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if backbone == "dit":
        return pretrain_coldit(manifest, profile, out, resume=resume, train_overrides=train_overrides,
                               model_overrides=model_overrides, progress=progress)
    config = train_config(profile, **(train_overrides or {}))
    out = Path(out)
    refuse_overwrite(out, resume)
    accelerator = make_accelerator(config)
    df = read_manifest(manifest)
    dataset, train_df = train_dataset(df, profile, config, source=manifest,
                                      image_size=(model_overrides or {}).get("image_size"))
    prior = fit_box_prior(train_df, manifest)
    torch.manual_seed(config.seed)  # identical initial weights on every process
    model = BUSGenUNet(**config_for_profile(profile, dataset.device_vocab, **(model_overrides or {})))
    check_run_settings(out, {"command": "pretrain", "profile": profile, "manifest": file_digest(manifest),
                             **asdict(config),
                             **{f"model.{k}": v for k, v in model_settings(model).items()}}, resume,
                       write=accelerator.is_main_process)
    model_dir = out / "model"
    if resume and finished(out, config.steps) and (model_dir / CONFIG_NAME).exists():
        return model_dir  # a finished run (notebooks call pretrain on every run): nothing to load or rewrite
    accelerator.wait_for_everyone()
    net = fit(model, dataset, config, out, accelerator, resume=resume, progress=progress)
    if accelerator.is_main_process:
        save_model(net, model_dir, extra_files={BOX_PRIOR_FILE: json.dumps(prior.to_json())})
    accelerator.wait_for_everyone()
    return model_dir


# --------------------------------------------------------------------------- CoLDiT: the same loop, two stages

SCALE_IMAGES = 256  # training images whose latents set CoLDiT's latent scale


def birads_rows(df: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """The rows CoLDiT learns from: those with one of the generated BI-RADS categories (3, 4a, 4b, 4c, 5)."""
    keep = df["birads"].astype(str).str.strip().str.lower().isin(BIRADS_CLASSES)
    if not (keep & (df["split"] == "train")).any():
        found = df.loc[df["split"] == "train", "birads"].astype(str).value_counts().to_dict()
        raise DataError(f"{source}: no train rows with birads {', '.join(BIRADS_CLASSES)} (train rows' birads: "
                        f"{found}); CoLDiT is conditioned on BI-RADS, so it needs lesion images with these categories")
    return df[keep]


def pretrain_coldit(manifest: str | Path, profile: str, out: str | Path, *, resume: bool = False,
                    train_overrides: dict[str, Any] | None = None, model_overrides: dict[str, Any] | None = None,
                    progress: bool = True) -> Path:
    """CoLDiT in two stages through `fit`: the autoencoder into `out/vae/` (its model: `out/vae/model`), then the
    DiT over its frozen latents into `out/` (the model: `out/model`). Both stages resume exactly; `train_overrides`
    (e.g. --steps) apply to both."""
    settings = get_coldit(profile)
    vae_config = train_config(profile, **{**settings.vae_train, **(train_overrides or {})})
    dit_config = train_config(profile, **{**settings.dit_train, **(train_overrides or {})})
    out = Path(out)
    refuse_overwrite(out, resume)
    make_accelerator(vae_config)  # refuses a batch size the processes cannot share, before any work
    df = birads_rows(read_manifest(manifest), manifest)
    torch.manual_seed(dit_config.seed)  # identical initial weights on every process
    model = build_coldit(profile, **(model_overrides or {}))
    accelerator = make_accelerator(dit_config)
    check_run_settings(out, {"command": "pretrain", "backbone": "dit", "profile": profile,
                             "manifest": file_digest(manifest), **asdict(dit_config),
                             **{f"vae.{k}": v for k, v in asdict(vae_config).items()},
                             **{f"model.{k}": v for k, v in model_settings(model).items()}}, resume,
                       write=accelerator.is_main_process)
    model_dir, vae_dir = out / "model", out / "vae"
    if resume and finished(out, dit_config.steps) and (model_dir / CONFIG_NAME).exists():
        return model_dir
    if not (resume and finished(vae_dir, vae_config.steps) and (vae_dir / "model" / CONFIG_NAME).exists()):
        dataset, train_df = train_dataset(df, profile, vae_config, source=manifest, birads=True)
        model.dit.requires_grad_(False)
        accelerator.wait_for_everyone()
        net = fit(model, dataset, vae_config, vae_dir, make_accelerator(vae_config), resume=resume,
                  progress=progress, desc="coldit autoencoder",
                  loss_fn=lambda m, batch: vae_loss(m, batch, model.config.kl_weight))
        set_latent_scale(net, load_images(train_df.head(SCALE_IMAGES), net.config.image_size))
        if accelerator.is_main_process:
            save_model(net, vae_dir / "model")
    accelerator.wait_for_everyone()
    model = load_coldit(vae_dir / "model", profile)
    model.vae.requires_grad_(False)
    dataset, _ = train_dataset(df, profile, dit_config, source=manifest, birads=True)
    net = fit(model, dataset, dit_config, out, accelerator, resume=resume, progress=progress, desc="coldit DiT")
    if accelerator.is_main_process:
        save_model(net, model_dir)
    accelerator.wait_for_everyone()
    return model_dir
