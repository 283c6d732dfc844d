"""`python -m busgen_lib downstream train|evaluate`: any manifest drops in, e.g. a hospital's own test set.

    downstream train --task benign-malignant --manifest M [--manifest M2 ...] --out DIR [--profile P]
                     [--model bus-dm|baseline-clip] [--seed S] [--cv]
    downstream evaluate --model DIR --manifest TEST --out scores.csv

`train` writes a model folder that records its task, backbone, input size and
training manifests; `evaluate` writes one row per test image and prints one
summary line (AUC with its DeLong 95% CI, or AP50 / AP_small for detection).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from busgen_lib.data.manifest import read_manifest, resolve
from busgen_lib.downstream.tasks import Task
from busgen_lib.errors import DataError
from busgen_lib.profiles import PROFILES

DETECTION_RECORD = "detection.json"  # beside the detector's own files: task, AP_small threshold, manifests
ALL_SPLITS = "all"


# --------------------------------------------------------------------------- manifests

def read_manifests(paths: list[str], split: str) -> pd.DataFrame:
    """The rows of `split` (comma-separated, or "all") of one or more manifests, image paths made absolute."""
    frames = []
    wanted = None if split == ALL_SPLITS else {s.strip() for s in split.split(",")}
    for path in paths:
        df = read_manifest(path)
        for column in ("image", "mask"):
            df[column] = ["" if not str(v) else str(resolve(df, column, i)) for i, v in enumerate(df[column])]
        if wanted is not None:
            df = df[df["split"].astype(str).isin(wanted)]
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True)
    if rows.empty:
        raise DataError(f"{', '.join(paths)}: no rows in split {split!r}; pick another with --split "
                        f"(or --split {ALL_SPLITS})")
    rows.attrs["root"] = str(Path(paths[0]).resolve().parent)
    rows.attrs["source"] = ", ".join(paths)  # named by Task.select's errors
    return rows


# --------------------------------------------------------------------------- commands

def _train(args: argparse.Namespace) -> int:
    task = Task.parse(args.task)
    train_df = read_manifests(args.manifest, args.split)
    out = Path(args.out)
    if task.is_detection:
        return _train_detector(args, train_df, out)
    from busgen_lib.downstream.training import cross_validate

    trainer = _trainer(args)
    lr = epochs = None
    if args.cv:
        cv = cross_validate(trainer, train_df, task, args.profile, seed=args.seed, progress=True)
        out.mkdir(parents=True, exist_ok=True)
        cv.table.to_csv(out / "cv.csv", index=False)
        lr, epochs = cv.best["lr"], cv.best["epochs"]
        print(f"cross-validation chose lr={lr:g}, epochs={epochs}")
    model = trainer(train_df, task, args.profile, seed=args.seed, lr=lr, epochs=epochs, sources=args.manifest,
                    progress=True)
    model.save(out)
    print(f"{out}: {model.record['model']} for {task} ({model.record['backbone']}, {model.input_size} px, "
          f"{model.record['n_train']} training images)")
    return 0


def _trainer(args: argparse.Namespace):
    if args.model == "baseline-clip":
        from functools import partial

        from busgen_lib.downstream.clip_baseline import train_baseline_clip

        return partial(train_baseline_clip, clip_weights=args.clip_weights)
    from busgen_lib.downstream.classifier import train_classifier

    return train_classifier


def _train_detector(args: argparse.Namespace, train_df: pd.DataFrame, out: Path) -> int:
    from busgen_lib.downstream import detector
    from busgen_lib.downstream.training import manifest_record

    model = detector.train_detector(train_df, args.profile, seed=args.seed, progress=True)
    model.save(out)
    threshold = float(detector.small_area_threshold(train_df))
    (out / DETECTION_RECORD).write_text(json.dumps(
        {"task": "detection", "profile": args.profile, "seed": args.seed, "small_threshold": threshold,
         "manifests": manifest_record(args.manifest)}, indent=1))
    print(f"{out}: detector ({len(train_df)} training images); small lesions: relative area < {threshold:.3f} "
          "(paper: 0.068)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    folder = Path(args.model)
    test_df = read_manifests([args.manifest], args.split)
    if (folder / DETECTION_RECORD).exists():
        return _evaluate_detector(args, folder, test_df)
    from busgen_lib.downstream.classifier import DiagnosticModel
    from busgen_lib.evaluate.stats import delong_ci

    model = DiagnosticModel.load(folder)
    rows, y = model.task.select(test_df)
    score = model.predict_proba(rows)
    scores = pd.DataFrame({"image": rows["image"].to_numpy(), "patient_id": rows["patient_id"].to_numpy(),
                           "label": y, "score": score})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    scores.to_csv(args.out, index=False)
    auc, lo, hi = delong_ci(y, score)
    print(f"{model.task} on {args.manifest}: AUC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f}, DeLong), n={len(y)} "
          f"({int(y.sum())} positive); scores in {args.out}")
    return 0


def _evaluate_detector(args: argparse.Namespace, folder: Path, test_df: pd.DataFrame) -> int:
    from busgen_lib.downstream import detector

    record = json.loads((folder / DETECTION_RECORD).read_text())
    if "boxes" not in test_df.columns:
        raise DataError(f"{args.manifest}: detection needs a 'boxes' column")
    model = detector.Detector.load(folder)
    predictions = model.predict(test_df)
    pd.DataFrame({"image": test_df["image"].to_numpy(),
                  "boxes": [json.dumps(_as_list(p["boxes"])) for p in predictions],
                  "scores": [json.dumps(_as_list(p["scores"])) for p in predictions]}).to_csv(args.out, index=False)
    result = detector.evaluate_detection(model, test_df, small_threshold=record["small_threshold"])
    summary = ", ".join(f"{k} {_fmt(v)}" for k, v in result.items())
    print(f"detection on {args.manifest} (small: relative area < {record['small_threshold']:.3f}): {summary}; "
          f"boxes in {args.out}")
    return 0


def _as_list(value) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- parser

def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `downstream train|evaluate` on a top-level parser's subparsers."""
    parser = subparsers.add_parser("downstream", help="train and evaluate diagnostic models (BUS-DM, Baseline-CLIP, "
                                                      "detector) on any manifest")
    sub = parser.add_subparsers(dest="downstream_command", required=True,
                                help="train: fit a model on manifests; evaluate: score a test manifest with it")

    p = sub.add_parser("train", help="train a model for a task on one or more manifests")
    p.add_argument("--task", required=True,
                   help="benign-malignant | detection | <column>:<negative>,<positive> "
                        "(e.g. subtype:fibroadenoma,dcis)")
    p.add_argument("--manifest", action="append", required=True, help="training manifest (repeat to pool several)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--profile", default="demo", choices=list(PROFILES), help="run profile: backbone, input size, recipe")
    p.add_argument("--model", choices=("bus-dm", "baseline-clip"), default="bus-dm",
                   help="BUS-DM (a classifier trained from scratch) or Baseline-CLIP (report-contrastive, then fine-tuned)")
    p.add_argument("--seed", type=int, default=0, help="weights, batches and augmentation follow it")
    p.add_argument("--split", default="train", help=f"manifest split(s) to train on, comma-separated, or {ALL_SPLITS}")
    p.add_argument("--cv", action="store_true", help="choose lr and epochs by 5-fold patient-grouped CV first (§4.4)")
    p.add_argument("--clip-weights", help="baseline-clip: your own open_clip weights to start from")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="score a test manifest with a trained model folder")
    p.add_argument("--model", required=True, help="model folder written by `downstream train`")
    p.add_argument("--manifest", required=True, help="test manifest (must carry the task's labels)")
    p.add_argument("--out", required=True, help="per-image scores (CSV)")
    p.add_argument("--split", default=ALL_SPLITS, help=f"manifest split(s) to score, comma-separated, or {ALL_SPLITS}")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `downstream ...` alone (as tests and scripts do); `python -m busgen_lib downstream` is the same."""
    parser = argparse.ArgumentParser(prog="busgen")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
