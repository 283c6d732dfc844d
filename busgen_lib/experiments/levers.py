"""Which generation lever moves the external AUC most per CPU-minute (the real-data study of notebook 07).

The generated arm of the leave-one-dataset-out study has knobs: how many images are generated, the guidance
weight, and the generator itself — its training steps, width and resolution (a lever names its generator folder;
`pretrain_variants` trains the reference generator's variants beside it). A `Lever` is one setting of them.
`lever_sets` samples each lever's set (`pipeline.sample_dataset`, resumable); `lever_scores` trains BUS-DM on it
with every seed through `generalisation.score_arms` (stamped, resumable). `lever_costs` counts what a setting costs in FLOPs with torch's
`FlopCounterMode` — the generator's training steps, sampling one image, one classifier step per image — so the
costs are the same on every machine and after a resumed run. `lever_table` sets each lever's external AUC gain
over the reference lever, paired by seed, against its extra cost, converted to CPU-minutes at a rate measured on
this machine (`sampling_rate`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from busgen_lib import plotting
from busgen_lib.data.manifest import read_manifest
from busgen_lib.diffusion import pipeline
from busgen_lib.diffusion.checkpoint import load_generator, load_model
from busgen_lib.diffusion.generate import PLAN_FILE, read_plan
from busgen_lib.diffusion.plan import Request
from busgen_lib.diffusion.train import diffusion_objective, pretrain, train_config, train_dataset
from busgen_lib.downstream.classifier import create_backbone, downstream_settings
from busgen_lib.errors import DataError, UsageError
from busgen_lib.evaluate.scaling import mean_ci
from busgen_lib.evaluate.stats import paired_differences
from busgen_lib.evaluate.training import TrainFn
from busgen_lib.experiments.coldit import batch_flops, step_flops
from busgen_lib.experiments.generalisation import TASK, absolute, auc_by_seed, score_arms, task_rows
from busgen_lib.parallel import run_jobs


@dataclass(frozen=True)
class Lever:
    """One setting of the generated arm: which generator, how many images, sampled how."""

    name: str
    generator: Path                # a BUSGen model folder (the model/ folder of a pretrain run)
    n: int                         # generated images
    sampling: Mapping = field(default_factory=dict)  # sample_dataset's sampler, steps, order, guidance


def one_knob_levers(generator: Path, n: int, sampling: Mapping, images: Sequence[int] = (),
                    guidance: Sequence[float] = (), generators: Mapping[str, Path] | None = None) -> list[Lever]:
    """The reference setting (`n` images sampled with `sampling` from `generator`) first, then each other image
    count, each other guidance weight and each other generator (name: model folder), one knob moved at a time."""
    return ([Lever(f"{n} images (reference)", generator, n, sampling)]
            + [Lever(f"{k} images", generator, k, sampling) for k in images]
            + [Lever(f"guidance {g}", generator, n, dict(sampling) | {"guidance": g}) for g in guidance]
            + [Lever(name, folder, n, sampling) for name, folder in (generators or {}).items()])


VARIANT_KEYS = {"train", "model"}  # pretrain's train_overrides and model_overrides
MIN_PRICED_MINUTES = 0.01  # levers closer in cost than this to the reference are free: no AUC per CPU-minute


def variant_folder(reference: str | Path, name: str) -> Path:
    """The run folder of the reference generator's variant `name`: beside the reference's run folder."""
    run = Path(reference).parent
    return run.parent / f"{run.name}-{name.replace(' ', '-')}"


def pretrain_variants(pool: str | Path, profile: str, reference: str | Path, variants: Mapping[str, Mapping],
                      workers: int | None = None) -> dict[str, Path]:
    """Model folders of the reference generator's variants, each pretrained on `pool` with `pretrain`'s overrides
    (`{"train": {"steps": 750}}`, `{"model": {"image_size": 32}}`) beside the reference run (resumable), one
    process per variant (`parallel.run_jobs`)."""
    for name, variant in variants.items():
        if not set(variant) <= VARIANT_KEYS:
            raise UsageError(f"generator variant {name!r}: unknown keys {sorted(set(variant) - VARIANT_KEYS)}; "
                             f"a variant has {sorted(VARIANT_KEYS)} (pretrain's train_overrides, model_overrides)")
    names = list(variants)

    def train(name: str) -> Path:
        return pretrain(pool, profile, variant_folder(reference, name), resume=True, progress=False,
                        train_overrides=variants[name].get("train"), model_overrides=variants[name].get("model"))

    return dict(zip(names, run_jobs(names, train, workers)))


def lever_study(levers: Sequence[Lever], pool: str | Path, tests: Mapping[str, pd.DataFrame], train_fn: TrainFn,
                seeds: Sequence[int], profile: str, out_dir: str | Path, seed: int = 0,
                sets: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """`lever_table` of BUS-DM trained on each lever's set and scored on `tests` (the "external" set, judged, and
    any others, shown: the internal test says whether a choice made on the external set would hold without it),
    against the first lever; costs counted on `pool` (the generators' training data), priced at this machine's
    sampling rate. `sets`: the levers' sets when the caller already has them (`lever_sets`), else sampled here."""
    if "external" not in tests:
        raise UsageError(f"the lever study judges levers on an 'external' test set; got {list(tests)}")
    sets = lever_sets(levers, out_dir, seed) if sets is None else sets
    per_seed = lever_scores(sets, tests, train_fn, seeds, out_dir)
    reference = levers[0]
    return lever_table(per_seed, lever_costs(levers, pool, profile), reference.name,
                       sampling_rate(reference.generator, reference.sampling))


def run_record(model_dir: str | Path) -> dict:
    """The settings of a pretrain run (steps, batch size, ...), from the run.json beside its model/ folder."""
    record = Path(model_dir).parent / "run.json"
    if not record.exists():
        raise DataError(f"{model_dir}: no run.json in its run folder; is this the model/ folder of a pretrain run?")
    return json.loads(record.read_text())


def generator_flops(model_dir: str | Path, df: pd.DataFrame) -> int:
    """Training FLOPs of the generator in `model_dir`: its run's steps x one step of its own network (width,
    resolution) on a batch of `df` of the run's batch size, as `pretrain` builds it."""
    record, net = run_record(model_dir), load_model(model_dir).train()
    config = train_config(net.config.profile, batch_size=record["batch_size"])
    dataset = train_dataset(df, net.config.profile, config, device_vocab=tuple(net.config.device_names),
                            image_size=net.config.image_size)[0]
    return int(record["steps"]) * batch_flops(net, diffusion_objective(net), dataset, config.batch_size)


def lever_sets(levers: Sequence[Lever], out_dir: str | Path, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Each lever's generated benign/malignant rows, sampled under `out_dir` (resumable).

    Levers that differ only in `n` share one sample of the largest n (or of a larger
    one the folder already holds): a balanced plan's request i and its image depend on
    (seed, i) alone (`plan.balanced_plan`, per-sample noise), so the first n rows of a
    larger set are the set of n.
    """
    names = [lever.name for lever in levers]
    if len(set(names)) != len(names):
        raise UsageError(f"lever names must differ, got {names}")
    groups: dict[tuple[Path, str], list[Lever]] = {}
    for lever in levers:
        groups.setdefault((Path(lever.generator), json.dumps(dict(lever.sampling), sort_keys=True)), []).append(lever)
    sets = {}
    for (generator, sampling), members in groups.items():
        options = json.loads(sampling)
        folder = Path(out_dir) / "-".join([generator.parent.name, *(f"{k}{v}" for k, v in sorted(options.items()))])
        # a folder holding a larger sample (an earlier study's) serves every smaller count with its first n rows
        stored = len(read_plan(folder)) if (folder / PLAN_FILE).exists() else 0
        manifest = pipeline.sample_dataset(generator, max(stored, *(lever.n for lever in members)), folder,
                                           pathologies=TASK, seed=seed, **options)
        rows = task_rows(absolute(read_manifest(manifest)))
        for lever in members:
            sets[lever.name] = rows[rows["index"].astype(int) < lever.n].reset_index(drop=True)
    return sets


def lever_scores(sets: Mapping[str, pd.DataFrame], tests: Mapping[str, pd.DataFrame], train_fn: TrainFn,
                 seeds: Sequence[int], out_dir: str | Path) -> pd.DataFrame:
    """Per-seed AUC of BUS-DM trained on each lever's set, on every test (`generalisation.auc_by_seed`)."""
    return auc_by_seed(score_arms(sets, tests, train_fn, seeds, out_dir, model_name="levers", progress=False))


# --------------------------------------------------------------------------- costs

def sampling_flops(model_dir: str | Path, sampling: Mapping) -> int:
    """FLOPs of sampling one image from `model_dir` with `sampling` (the network's convolutions and matmuls)."""
    return _one_image_flops(load_generator(model_dir), sampling)


def sampling_rate(model_dir: str | Path, sampling: Mapping, n: int = 8) -> float:
    """FLOP/s of one thread's CPU time on this machine, sampling `n` images from `model_dir`: converts FLOPs to
    CPU-s. One thread: the CPU time of a second one includes its spin-waiting, which grows with the machine's load
    (two threads on the loaded 2-core machine measured a rate 5x lower than on the quiet one)."""
    model = load_generator(model_dir)
    requests = [_request(i) for i in range(n)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        pipeline.sample_images(model, requests, batch_size=n, progress=False,
                               **pipeline.sampling_options(model, **sampling))
        seconds = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    return n * _one_image_flops(model, sampling) / seconds


def _request(index: int) -> Request:
    """A malignant request with one box: FLOPs and time do not depend on the conditions."""
    return Request(index=index, seed=index, pathology="malignant", device="", boxes=[(0.3, 0.3, 0.6, 0.6)])


def _one_image_flops(model, sampling: Mapping) -> int:
    with FlopCounterMode(display=False) as counter:
        pipeline.sample_images(model, [_request(0)], progress=False, **pipeline.sampling_options(model, **sampling))
    return counter.get_total_flops()


def classifier_flops_per_image(profile: str, backbone: str | None = None) -> float:
    """Forward + backward FLOPs of BUS-DM's training on one image (one batch of the profile's size, divided)."""
    settings = downstream_settings(profile, backbone)
    network = create_backbone(settings.backbone, settings.backbone_kwargs).train()
    x = torch.zeros(settings.batch_size, 1, settings.input_size, settings.input_size)
    y = torch.zeros(settings.batch_size, dtype=torch.int64)
    return step_flops(network, lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), {"x": x, "y": y}) / settings.batch_size


def lever_costs(levers: Sequence[Lever], pool: str | Path, profile: str, epochs: int | None = None,
                backbone: str | None = None) -> pd.DataFrame:
    """TFLOP per lever: the generator's training (`generator_flops` on `pool`), sampling its images, and one
    BUS-DM training run on them (`epochs`, default the profile's; an epoch is one pass of len(set) draws)."""
    df = read_manifest(pool)
    folders = dict.fromkeys(Path(lever.generator) for lever in levers)  # each generator costed once
    training = {folder: generator_flops(folder, df) for folder in folders}
    per_image = classifier_flops_per_image(profile, backbone)
    epochs = epochs or downstream_settings(profile, backbone).epochs
    rows = []
    for lever in levers:
        rows.append({"lever": lever.name, "generator TFLOP": training[Path(lever.generator)] / 1e12,
                     "sampling TFLOP": lever.n * sampling_flops(lever.generator, lever.sampling) / 1e12,
                     "BUS-DM TFLOP": lever.n * epochs * per_image / 1e12})
    table = pd.DataFrame(rows)
    table["total TFLOP"] = table[["generator TFLOP", "sampling TFLOP", "BUS-DM TFLOP"]].sum(axis=1)
    return table


# --------------------------------------------------------------------------- the table

def lever_table(per_seed: pd.DataFrame, costs: pd.DataFrame, reference: str, rate: float, test: str = "external",
                level: float = 0.95) -> pd.DataFrame:
    """Per lever: the `test` AUC (mean over seeds, t-interval), the other tests' mean AUCs, its gain over
    `reference` on `test` paired by seed (mean, t-interval, paired t-test P, Wilcoxon P), its extra cost in
    CPU-minutes at `rate` FLOP/s, and the AUC per CPU-minute between it and the reference (gain / extra cost:
    what a dearer lever buys, or a cheaper one gives up, per minute; undefined for a lever of the same cost)."""
    auc = per_seed[per_seed["test"] == test].pivot_table(index="seed", columns="arm", values="auc")
    others = per_seed[per_seed["test"] != test].groupby(["test", "arm"])["auc"].mean()  # shown beside, not judged
    if reference not in auc.columns:
        raise UsageError(f"reference lever {reference!r} has no {test!r} AUCs; levers: {list(auc.columns)}")
    total = costs.set_index("lever")["total TFLOP"]
    rows = []
    for name in [lever for lever in costs["lever"] if lever in auc.columns]:  # the levers' own order
        mean, lo, hi = mean_ci(auc[name].to_numpy())
        extra = (total[name] - total[reference]) * 1e12 / rate / 60
        row = {"lever": name, "seeds": int(auc[name].notna().sum()), f"{test} AUC": mean, "lo": lo, "hi": hi,
               **{f"{other} AUC": others.get((other, name), np.nan)
                  for other in others.index.get_level_values("test").unique()},
               "CPU-min": total[name] * 1e12 / rate / 60, "extra CPU-min": extra}
        if name != reference:
            row |= paired_differences(auc[name].to_numpy(), auc[reference].to_numpy(), level)
            # the marginal rate either way: a dearer lever's gain per minute spent, a cheaper one's loss per
            # minute saved
            row["AUC per CPU-min"] = row["diff_mean"] / extra if abs(extra) >= MIN_PRICED_MINUTES else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def lever_figure(table: pd.DataFrame, reference: str, test: str = "external") -> plt.Figure:
    """Each lever's `test` AUC (mean over seeds, t-interval) against its CPU-minutes, the reference marked.

    Levers of one cost (guidance weights, say) are set side by side and their
    labels stacked beside them, lowest AUC lowest, so none hides another.
    """
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    cost = table["CPU-min"].to_numpy(float)
    x_span = np.ptp(cost) or 1.0
    label_gap = 0.06 * (np.nanmax(table["hi"]) - np.nanmin(table["lo"]) or 1.0)
    for _, group in table.groupby(table["CPU-min"].round(1)):
        group = group.sort_values(f"{test} AUC")
        dodge = (np.arange(len(group)) - (len(group) - 1) / 2) * 0.012 * x_span
        steps = label_gap * np.arange(len(group))   # label k at least k gaps above the lowest, never below its point
        label_y = np.maximum.accumulate(group[f"{test} AUC"].to_numpy(float) - steps) + steps
        # labels to the right, but to the left of a dear group that has cheaper points near it
        group_cost = group["CPU-min"].iloc[0]
        right = group_cost < cost.min() + 0.7 * x_span or group_cost == cost.max()
        label_x = group_cost + (1 if right else -1) * (dodge.max() + 0.02 * x_span)
        for (_, row), x, y in zip(group.iterrows(), group["CPU-min"] + dodge, label_y):
            mean, lo, hi = row[f"{test} AUC"], row["lo"], row["hi"]
            colour = plotting.PALETTE["real"] if row["lever"] == reference else plotting.PALETTE["generated"]
            ax.errorbar(x, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", color=colour, capsize=2)
            ax.annotate(row["lever"], (x, mean), xytext=(label_x, y), textcoords="data", fontsize=6, va="center",
                        ha="left" if right else "right", arrowprops=dict(arrowstyle="-", lw=0.3, color="0.6"))
    ax.set(xlabel="CPU-minutes (generator training + sampling + one BUS-DM fit)", ylabel=f"{test} AUC",
           title=f"levers of the generated arm (dark: {reference})")
    ax.set_xlim(cost.min() - 0.1 * x_span, cost.max() + 0.3 * x_span)   # room for the dearest lever's label
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return fig
