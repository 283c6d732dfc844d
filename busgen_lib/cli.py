"""`python -m busgen_lib ...`: thin command-line entry points over the library.

Every command validates its input before doing work and exits non-zero with
one line per problem, so that scripts and schedulers see failures plainly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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

    manifest = write_phantom(Path(args.out), n=args.n, size=args.size, seed=args.seed)
    print(manifest)
    return 0


def _import(args: argparse.Namespace) -> int:
    from busgen_lib.data import importers

    out = Path(args.out)
    if args.kind == "busi":
        manifest = importers.import_busi(Path(args.source), out)
    elif args.kind == "busbra":
        manifest = importers.import_busbra(Path(args.source), out)
    elif args.kind == "folder":
        if not args.labels:
            raise SystemExit("import folder needs --labels CSV (image file name and pathology per row)")
        manifest = importers.import_folder(Path(args.source), Path(args.labels), out)
    else:
        manifest = importers.import_shared(args.kind, Path(args.source), out)
    print(manifest)
    return 0


# ---------------------------------------------------------------------- diffusion

def _pretrain(args: argparse.Namespace) -> int:
    from busgen_lib.diffusion.train import pretrain

    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size}.items() if v is not None}
    model_dir = pretrain(args.manifest, args.profile, args.out, resume=args.resume, train_overrides=overrides,
                         model_overrides={"box_mode": args.box_mode} if args.box_mode else None)
    print(model_dir)
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from busgen_lib.diffusion.lora import AdapterConfig, adapt

    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size}.items() if v is not None}
    config = AdapterConfig(rank=args.rank, targets=tuple(args.targets))
    print(adapt(args.model, args.manifest, args.adapter, args.out, adapter_config=config, train_overrides=overrides,
                resume=args.resume))
    return 0


def _protect(args: argparse.Namespace) -> int:
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.diffusion.checkpoint import load_model
    from busgen_lib.diffusion.privacy import protect
    from busgen_lib.evaluate.control import load_images

    config = load_model(args.model).config
    df = read_manifest(args.manifest)
    df = df[df["split"].astype(str) == "train"]
    fit = protect(load_images(df, config.image_size), config, args.out, steps=args.steps, seed=args.seed)
    print(f"{args.out}: {len(df)} training images, clean accuracy {fit.clean_accuracy:.3f} "
          f"(near 1: memorised, CPSample can recognise them; near 0.5: train longer)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from busgen_lib.diffusion.pipeline import sample_dataset

    cond_fn = None
    if args.cpsample:
        from busgen_lib.diffusion.checkpoint import load_model
        from busgen_lib.diffusion.privacy import CPSampleGuidance, load_classifier
        from busgen_lib.diffusion.schedule import ddpm_scheduler

        alphas_cumprod = ddpm_scheduler(load_model(args.model).config).alphas_cumprod
        settings = {"alpha": args.cpsample_alpha, "scale": args.cpsample_scale}
        cond_fn = CPSampleGuidance(load_classifier(args.cpsample), alphas_cumprod,
                                   **{k: v for k, v in settings.items() if v is not None})
    manifest = sample_dataset(args.model, args.n, args.out, plan=args.plan, steps=args.steps, guidance=args.guidance,
                              sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, adapter=args.adapter,
                              cond_fn=cond_fn)
    print(manifest)
    return 0


def _clean(args: argparse.Namespace) -> int:
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.diffusion.cleaning import clean_dataset, fit_label_classifier
    from busgen_lib.evaluate.control import load_images

    judge = fit_label_classifier(read_manifest(args.real), args.column, size=args.size, epochs=args.epochs,
                                 seed=args.seed)
    result = clean_dataset(args.manifest, judge, load_images(read_manifest(args.manifest), args.size), args.column,
                           args.confidence)
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

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m busgen_lib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a manifest (CSV or Parquet) and its image files")
    p.add_argument("manifest", help="manifest.csv or manifest.parquet")
    p.add_argument("--root", default=None, help="folder image paths are relative to (default: the manifest's folder)")
    p.add_argument("--no-images", action="store_true", help="check the table only, not the image files")
    p.set_defaults(func=_validate)

    p = sub.add_parser("phantom", help="render the procedural B-mode phantom dataset")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--out", required=True, help="output folder (images/, masks/, manifest.csv)")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("import", help="write a manifest for a dataset in its downloaded layout")
    p.add_argument("kind", choices=["busi", "busbra", "folder", "busi_compact", "bus_uclm", "breast_lesions_usg"],
                   help="busi / busbra: downloaded layouts; folder: images + --labels CSV; "
                        "the others: the compact copies (see data_manifests/README.md)")
    p.add_argument("source", help="the dataset's folder")
    p.add_argument("--labels", help="for `folder`: CSV with the image file name and pathology per row")
    p.add_argument("--out", required=True, help="output folder for manifest.csv")
    p.set_defaults(func=_import)

    p = sub.add_parser("pretrain", help="train the conditional diffusion model (runs under `accelerate launch` too)")
    p.add_argument("--manifest", required=True, help="training manifest (rows with split == train are used)")
    p.add_argument("--profile", default="demo", help="smoke | demo | paper: image size, network and optimiser")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, loss.csv, model/")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--steps", type=int, help="override the profile's number of optimisation steps")
    p.add_argument("--batch-size", type=int, help="override the profile's global batch size")
    p.add_argument("--box-mode", choices=["mask", "embedding", "both"],
                   help="box conditioning: box-mask channel (reference code), sinusoidal embedding (paper), or both")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("adapt", help="train a LoRA adapter on a frozen pretrained model (few-shot adaptation)")
    p.add_argument("--model", required=True, help="pretrained model folder")
    p.add_argument("--manifest", required=True, help="adaptation manifest (rows with split == train are used)")
    p.add_argument("--adapter", required=True, help="adapter name, e.g. dcis")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, loss.csv, adapter/")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", nargs="+", default=["attention", "resnet", "conditioning"],
                   choices=["attention", "resnet", "conditioning"], help="layer groups that get adapters")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--steps", type=int, help="override the profile's number of adaptation steps")
    p.add_argument("--batch-size", type=int, help="override the profile's batch size")
    p.set_defaults(func=_adapt)

    p = sub.add_parser("sample", help="generate a labelled synthetic dataset from a trained model folder")
    p.add_argument("--model", required=True, help="model folder (config.json, model.safetensors, box_prior.json)")
    p.add_argument("--adapter", help="LoRA adapter folder trained on this model (merged before sampling)")
    p.add_argument("--n", type=int, default=0, help="number of images for the balanced plan")
    p.add_argument("--out", required=True, help="output folder (images/, shards/, manifest.csv); reruns resume")
    p.add_argument("--plan", default="balanced",
                   help="'balanced' (pathology x device, boxes from the model's box prior) or a CSV with "
                        "pathology, device and optional boxes / seed per row")
    p.add_argument("--steps", type=int, help="solver steps (default: the model profile's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w of eq. 2 (default 1.8)")
    p.add_argument("--sampler", choices=["dpmsolver++-singlestep", "dpmsolver++", "ddpm"],
                   help="default: DPM-Solver++ singlestep, order 3")
    p.add_argument("--seed", type=int, default=0, help="plan seed: sample i always gets the same noise")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpsample", help="CPSample classifier folder (from `protect`): steer away from training images")
    p.add_argument("--cpsample-alpha", type=float, help="certainty threshold α (default: privacy.DEFAULT_ALPHA)")
    p.add_argument("--cpsample-scale", type=float, help="guidance strength s (default: privacy.DEFAULT_SCALE)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("protect", help="train the CPSample classifier of a model's training images")
    p.add_argument("--model", required=True, help="model folder: its schedule and resolution")
    p.add_argument("--manifest", required=True, help="the manifest the model was trained on (train split used)")
    p.add_argument("--out", required=True, help="classifier folder (reused if it exists)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_protect)

    p = sub.add_parser("clean", help="remove generated images whose label a real-data classifier contradicts")
    p.add_argument("manifest", help="generated manifest; writes manifest_clean.csv and rejected.csv beside it")
    p.add_argument("--real", required=True, help="real manifest to train the judge on (train+val; test scores it)")
    p.add_argument("--column", default="pathology", help="label to check")
    p.add_argument("--confidence", type=float, default=0.5, help="reject when another class has at least this p")
    p.add_argument("--size", type=int, default=32, help="judge resolution (px)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_clean)

    p = sub.add_parser("notebooks", help="execute the numbered notebooks with papermill")
    p.add_argument("--profile", default="demo", help="smoke | demo | paper")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    p.add_argument("--repo", default=".", help="repository root")
    p.set_defaults(func=_notebooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
