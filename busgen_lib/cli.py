"""`python -m busgen_lib ...`: thin command-line entry points over the library.

Every command checks its input before doing work. A problem the user can fix
(busgen_lib.errors.BusgenError) is printed as one line, `busgen: error: <message>`,
with exit status 2 for options and 1 for data; `--debug` or BUSGEN_DEBUG=1 shows
the traceback as well.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path

from busgen_lib.data.schema import BIRADS_CLASSES, PATHOLOGIES
from busgen_lib.errors import BusgenError, DataError, UsageError
from busgen_lib.profiles import PROFILES

SAMPLERS = ("dpmsolver++-singlestep", "dpmsolver++", "unipc", "ddim", "ddpm")  # sample.SAMPLERS, as PRECISIONS
PRECISIONS = ("fp32", "bf16")  # speed.PRECISIONS, repeated so that `--help` does not import torch


# ------------------------------------------------------------------- option types

def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (steps, batch sizes, counts)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """An argparse type: a seed, an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {value}")
    return value


def finite_nonnegative(text: str) -> float:
    """An argparse type: a finite float >= 0 (guidance weights and strengths; nan and inf refused)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a probability in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1], got {text}")
    return value


# --------------------------------------------------------------------- path checks

def _existing(path: str, what: str, folder: bool = False) -> Path:
    """A user-given input path that must exist (and be a folder or a file); DataError otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: {what} not found; check the path")
    if folder and not p.is_dir():
        raise DataError(f"{p}: {what} must be a folder, but this is a file")
    if not folder and p.is_dir():
        raise DataError(f"{p}: {what} must be a file, but this is a folder")
    return p


def _out_folder(path: str) -> Path:
    """An output folder: it may exist, but not as a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{p}: --out must be a folder, but a file of that name exists; choose another --out")
    return p


def _train_rows(manifest: Path):
    """The rows of a manifest's train split, refusing a manifest without any."""
    from busgen_lib.data.manifest import read_manifest

    df = read_manifest(manifest)
    train = df[df["split"].astype(str) == "train"]
    if train.empty:
        raise DataError(f"{manifest}: no rows with split = train ({len(df)} rows in all); "
                        "mark the images to use as train in the split column")
    return train


# --------------------------------------------------------------------------- data

def _validate(args: argparse.Namespace) -> int:
    from busgen_lib.data.manifest import validate_manifest

    problems = validate_manifest(args.manifest, root=args.root, check_images=not args.no_images)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.manifest}", file=sys.stderr)
        return 1
    print(f"{args.manifest}: valid")
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from busgen_lib.data.phantom import write_phantom

    manifest = write_phantom(_out_folder(args.out), n=args.n, size=args.size, seed=args.seed)
    print(manifest)
    return 0


def _import(args: argparse.Namespace) -> int:
    from busgen_lib.data import importers

    source, out = _existing(args.source, "dataset folder", folder=True), _out_folder(args.out)
    if args.kind != "folder" and (args.labels or args.box_units != "auto"):
        raise UsageError("--labels and --box-units are for `import folder` only")
    if args.kind == "busi":
        manifest = importers.import_busi(source, out)
    elif args.kind == "busbra":
        manifest = importers.import_busbra(source, out)
    elif args.kind == "folder":
        if not args.labels:
            raise UsageError("import folder needs --labels CSV (image file name and pathology per row)")
        manifest = importers.import_folder(source, _existing(args.labels, "--labels CSV"), out,
                                           boxes_unit=args.box_units)
    else:
        manifest = importers.import_shared(args.kind, source, out)
    print(manifest)
    return 0


# ---------------------------------------------------------------------- diffusion

def _pretrain(args: argparse.Namespace) -> int:
    from busgen_lib.diffusion.train import pretrain

    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size}.items() if v is not None}
    if args.box_mode and args.backbone != "unet":
        raise UsageError("--box-mode is for --backbone unet; CoLDiT (dit) is conditioned on BI-RADS only")
    model_dir = pretrain(_existing(args.manifest, "manifest"), args.profile, _out_folder(args.out),
                         resume=args.resume, train_overrides=overrides, backbone=args.backbone,
                         model_overrides={"box_mode": args.box_mode} if args.box_mode else None)
    print(model_dir)
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from busgen_lib.diffusion.lora import AdapterConfig, adapt, check_adapter_name

    check_adapter_name(args.adapter)
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size}.items() if v is not None}
    config = AdapterConfig(rank=args.rank, targets=tuple(args.targets))
    print(adapt(_existing(args.model, "model folder", folder=True), _existing(args.manifest, "manifest"),
                args.adapter, _out_folder(args.out), adapter_config=config, train_overrides=overrides,
                resume=args.resume))
    return 0


def _protect(args: argparse.Namespace) -> int:
    from busgen_lib.diffusion.checkpoint import load_model
    from busgen_lib.diffusion.privacy import protect
    from busgen_lib.data.dataset import load_images

    config = load_model(_existing(args.model, "model folder", folder=True)).config
    manifest = _existing(args.manifest, "manifest")
    df = _train_rows(manifest)
    fit = protect(load_images(df, config.image_size), config, _out_folder(args.out), steps=args.steps,
                  seed=args.seed, source=manifest)
    print(f"{args.out}: {len(df)} training images, clean accuracy {fit.clean_accuracy:.3f} "
          f"(near 1: memorised, CPSample can recognise them; near 0.5: train longer)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from busgen_lib.diffusion.pipeline import sample_dataset
    from busgen_lib.diffusion.speed import Speed

    model = _existing(args.model, "model folder", folder=True)
    if args.plan == "balanced" and args.n is None:
        raise UsageError("sample needs --n (how many images) for the balanced plan, or --plan CSV")
    if args.plan != "balanced":
        _existing(args.plan, "--plan CSV")
        if args.n is not None or args.pathologies or args.devices or args.birads:
            raise UsageError("--n, --pathologies, --devices and --birads are for the balanced plan; "
                             "a --plan CSV lists its rows itself")
    if args.adapter:
        _existing(args.adapter, "adapter folder", folder=True)
    if args.birads or args.pathologies or args.devices or args.adapter:
        _check_backbone_options(args, model)
    if args.cpsample is None and (args.cpsample_alpha is not None or args.cpsample_scale is not None):
        raise UsageError("--cpsample-alpha and --cpsample-scale need --cpsample CLASSIFIER")
    cond_fn = None
    if args.cpsample:
        from busgen_lib.diffusion.checkpoint import load_model
        from busgen_lib.diffusion.privacy import CPSampleGuidance, load_classifier
        from busgen_lib.diffusion.schedule import ddpm_scheduler

        alphas_cumprod = ddpm_scheduler(load_model(model).config).alphas_cumprod
        settings = {"alpha": args.cpsample_alpha, "scale": args.cpsample_scale}
        cond_fn = CPSampleGuidance(load_classifier(_existing(args.cpsample, "CPSample classifier folder", folder=True)),
                                   alphas_cumprod, **{k: v for k, v in settings.items() if v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    speed = Speed(precision=args.precision, channels_last=args.channels_last, compile=args.compile)
    manifest = sample_dataset(model, args.n or 0, _out_folder(args.out), plan=args.plan, steps=args.steps,
                              guidance=args.guidance, sampler=args.sampler, seed=args.seed,
                              batch_size=args.batch_size, adapter=args.adapter,
                              pathologies=args.pathologies or PATHOLOGIES, devices=args.devices, cond_fn=cond_fn,
                              speed=speed, birads=args.birads or BIRADS_CLASSES)
    print(manifest)
    return 0


def _check_backbone_options(args: argparse.Namespace, model: Path) -> None:
    """Refuse the options of the other backbone (BUSGen's pathology/device/adapter, CoLDiT's BI-RADS) by name."""
    from busgen_lib.diffusion.checkpoint import backbone_of

    backbone = backbone_of(model)
    given = {"--birads": args.birads} if backbone == "unet" else \
        {"--pathologies": args.pathologies, "--devices": args.devices, "--adapter": args.adapter}
    wrong = [name for name, value in given.items() if value]
    if wrong:
        raise UsageError(f"{model} is a --backbone {backbone} model: {', '.join(wrong)} do not apply to it")


def _clean(args: argparse.Namespace) -> int:
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.evaluate.cleaning import clean_dataset, fit_label_classifier
    from busgen_lib.data.dataset import load_images

    generated_path, real_path = _existing(args.manifest, "generated manifest"), _existing(args.real, "--real manifest")
    generated, real = read_manifest(generated_path), read_manifest(real_path)
    for path, df in ((generated_path, generated), (real_path, real)):
        if args.column not in df.columns:
            raise UsageError(f"{path}: no column {args.column!r} for --column; it has {', '.join(df.columns)}")
        if df.empty:
            raise DataError(f"{path}: the manifest has no rows")
    classes = sorted(set(real.loc[real["split"].isin(["train", "val"]), args.column].astype(str)) - {""})
    if len(classes) < 2:
        raise DataError(f"{real_path}: the judge needs at least two {args.column} classes in the train and val "
                        f"splits, found {classes or 'none'}; use a real manifest labelled with {args.column}")
    judge = fit_label_classifier(real, args.column, size=args.size, epochs=args.epochs, seed=args.seed)
    result = clean_dataset(generated_path, judge, load_images(generated, args.size), args.column, args.confidence)
    print(result.rates.to_string(index=False))
    return 0


# ---------------------------------------------------------------------- notebooks

def _notebooks(args: argparse.Namespace) -> int:
    from busgen_lib.runner import run_notebooks

    timings = run_notebooks(args.profile, Path(args.repo), only=args.only)
    for name, seconds in timings.items():
        print(f"{name:40s} {seconds:8.1f} s")
    print(f"{'total':40s} {sum(timings.values()):8.1f} s")
    return 0


# ------------------------------------------------------------------------ parser

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" where there is a value to show: not for None ("the profile's", said in the help)
    nor for on/off flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)parser shows defaults in --help, including commands added by other modules."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m busgen_lib", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment variable BUSGEN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    profiles = list(PROFILES)

    p = sub.add_parser("validate", help="check a manifest (CSV or Parquet) and its image files")
    p.add_argument("manifest", help="manifest.csv or manifest.parquet")
    p.add_argument("--root", default=None, help="folder image paths are relative to (default: the manifest's folder)")
    p.add_argument("--no-images", action="store_true", help="check the table only, not the image files")
    p.set_defaults(func=_validate)

    p = sub.add_parser("phantom", help="render the procedural B-mode phantom dataset")
    p.add_argument("--n", type=positive_int, required=True, help="number of images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (at least 32)")
    p.add_argument("--seed", type=seed_int, default=0, help="same seed, same bytes")
    p.add_argument("--out", required=True, help="new output folder (images/, masks/, manifest.csv)")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("import", help="write a manifest for a dataset in its downloaded layout")
    p.add_argument("kind", choices=["busi", "busbra", "folder", "busi_compact", "bus_uclm", "breast_lesions_usg"],
                   help="busi / busbra: downloaded layouts; folder: images + --labels CSV; "
                        "the others: the compact copies (see data_manifests/README.md)")
    p.add_argument("source", help="the dataset's folder")
    p.add_argument("--labels", help="for `folder`: CSV with the image file name and pathology per row")
    p.add_argument("--box-units", choices=["auto", "relative", "pixel"], default="auto",
                   help="for `folder`: unit of the CSV's boxes; auto decides from the values and refuses a CSV "
                        "that mixes relative-looking (all <= 1) and pixel-looking rows, naming them")
    p.add_argument("--out", required=True, help="output folder for manifest.csv")
    p.set_defaults(func=_import)

    p = sub.add_parser("pretrain", help="train the conditional diffusion model (runs under `accelerate launch` too)")
    p.add_argument("--manifest", required=True, help="training manifest (rows with split == train are used)")
    p.add_argument("--profile", default="demo", choices=profiles, help="image size, network and optimiser")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, loss.csv, model/")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (with the same settings)")
    p.add_argument("--steps", type=positive_int, help="number of optimisation steps (default: the profile's)")
    p.add_argument("--batch-size", type=positive_int, help="global batch size (default: the profile's)")
    p.add_argument("--box-mode", choices=["mask", "embedding", "both"],
                   help="box conditioning: box-mask channel (reference code), sinusoidal embedding (paper), or "
                        "both (default: the profile's)")
    p.add_argument("--backbone", choices=["unet", "dit"], default="unet",
                   help="unet: BUSGen's pixel UNet on pathology, device and boxes; dit: CoLDiT, an autoencoder then "
                        "a latent diffusion transformer on BI-RADS 3/4a/4b/4c/5 (rows with other BI-RADS are left out)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("adapt", help="train a LoRA adapter on a frozen pretrained model (few-shot adaptation)")
    p.add_argument("--model", required=True, help="pretrained model folder")
    p.add_argument("--manifest", required=True, help="adaptation manifest (rows with split == train are used)")
    p.add_argument("--adapter", required=True, help="adapter name: letters, digits and _, e.g. dcis")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, loss.csv, adapter/")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    p.add_argument("--targets", nargs="+", default=["attention", "resnet", "conditioning"],
                   choices=["attention", "resnet", "conditioning"], help="layer groups that get adapters")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (with the same settings)")
    p.add_argument("--steps", type=positive_int, help="number of adaptation steps (default: the profile's)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default: the profile's)")
    p.set_defaults(func=_adapt)

    p = sub.add_parser("sample", help="generate a labelled synthetic dataset from a trained model folder")
    p.add_argument("--model", required=True, help="model folder (config.json, diffusion_pytorch_model.safetensors, box_prior.json)")
    p.add_argument("--adapter", help="LoRA adapter folder trained on this model (merged before sampling)")
    p.add_argument("--n", type=positive_int, help="number of images of the balanced plan (required with it)")
    p.add_argument("--pathologies", nargs="+", choices=PATHOLOGIES,
                   help="pathologies of the balanced plan, e.g. malignant for a single-phenotype adapter "
                        f"(default: {' '.join(PATHOLOGIES)})")
    p.add_argument("--devices", nargs="+",
                   help="devices of the balanced plan, by the names the model was trained with "
                        "(default: all the model knows)")
    p.add_argument("--birads", nargs="+", choices=BIRADS_CLASSES,
                   help=f"CoLDiT models: BI-RADS categories of the balanced plan (default: {' '.join(BIRADS_CLASSES)}); "
                        "a --plan CSV for them has a birads column")
    p.add_argument("--out", required=True,
                   help="output folder (images/, shards/, manifest.csv); a rerun with the same settings resumes")
    p.add_argument("--plan", default="balanced",
                   help="'balanced' (pathology x device, boxes from the model's box prior) or a CSV with "
                        "pathology, device and optional boxes / seed per row")
    p.add_argument("--steps", type=positive_int, help="solver steps (default: the model profile's)")
    p.add_argument("--guidance", type=finite_nonnegative,
                   help="classifier-free guidance weight w of eq. 2, >= 0 (default: the model profile's, 1.8)")
    p.add_argument("--sampler", choices=SAMPLERS, help="solver (default: DPM-Solver++ singlestep, order 3)")
    p.add_argument("--seed", type=seed_int, default=0, help="plan seed: sample i always gets the same noise")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per sampler batch")
    p.add_argument("--cpsample", help="CPSample classifier folder (from `protect`): steer away from training images")
    p.add_argument("--cpsample-alpha", type=probability,
                   help="certainty threshold α in (0, 0.5] (default: CPSample's, 0.01)")
    p.add_argument("--cpsample-scale", type=finite_nonnegative,
                   help="guidance strength s (default: CPSample's, 100)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="network precision: fp32 (the reference) or bf16 autocast (faster where the CPU/GPU "
                        "has bf16 units; changes pixels slightly, recorded in settings.json)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for the network (same images up to fp32 rounding)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network once before sampling (needs a C compiler; same images up to "
                        "fp32 rounding; pays off for many images)")
    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: torch's, one per core); 1 on a shared machine (README)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("protect", help="train the CPSample classifier of a model's training images")
    p.add_argument("--model", required=True, help="model folder: its schedule and resolution")
    p.add_argument("--manifest", required=True, help="the manifest the model was trained on (train split used)")
    p.add_argument("--out", required=True,
                   help="classifier folder; reused if it holds a classifier of the same images, steps and seed")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps of the classifier")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random labels and the training")
    p.set_defaults(func=_protect)

    p = sub.add_parser("clean", help="remove generated images whose label a real-data classifier contradicts")
    p.add_argument("manifest", help="generated manifest; writes manifest_clean.csv and rejected.csv beside it")
    p.add_argument("--real", required=True, help="real manifest to train the judge on (train+val; test scores it)")
    p.add_argument("--column", default="pathology", help="label to check (a column of both manifests)")
    p.add_argument("--confidence", type=probability, default=0.5,
                   help="reject when another class has at least this probability")
    p.add_argument("--size", type=positive_int, default=32, help="judge resolution (px)")
    p.add_argument("--epochs", type=positive_int, default=20, help="judge training epochs")
    p.add_argument("--seed", type=seed_int, default=0, help="judge training seed")
    p.set_defaults(func=_clean)

    p = sub.add_parser("notebooks", help="execute the numbered notebooks with papermill")
    p.add_argument("--profile", default="demo", choices=profiles, help="profile the notebooks run under")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 01 03 (default: all)")
    p.add_argument("--repo", default=".", help="repository root (holds notebooks/)")
    p.set_defaults(func=_notebooks)

    from busgen_lib.downstream.cli import add_parser as add_downstream  # its heavy imports stay inside its commands

    add_downstream(sub)
    from busgen_lib.reader_study.cli import add_parser as add_reader_study

    add_reader_study(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a BusgenError becomes one line on stderr and its exit status (2 usage, 1 data)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("BUSGEN_DEBUG", "").strip().lower() in ("1", "true", "yes")
    try:
        return args.func(args)
    except BusgenError as err:
        if debug:
            traceback.print_exc()
        print(f"busgen: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
