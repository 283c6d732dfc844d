"""One fold of the real-data study (notebook 07): BUSGen trained without one public set, BUS-DM and Baseline-CLIP
trained on what it generates and on the real images, tested on the internal split and on the held-out set.

A fold pretrains BUSGen on the pool (the other sets, source set = device) and the variants of its lever study,
samples every lever's set (its reference is the generated arm), then scores the arms of `generalisation.design`:
BUS-DM on real, generated and generated + real images (learning rate and epochs cross-validated per training set),
and Baseline-CLIP on the real images (contrastive pretraining once, fine-tuned with every seed). Everything is kept
under the runs folder, so a rerun or a killed run only does what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from busgen_lib.diffusion.train import pretrain
from busgen_lib.downstream.clip_baseline import pretrained_clip
from busgen_lib.downstream.recipes import train_fn
from busgen_lib.downstream.tasks import Task
from busgen_lib.experiments import levers
from busgen_lib.experiments.generalisation import REAL, design, score_arms
from busgen_lib.profiles import get_study

TASK = Task.parse("benign-malignant")


@dataclass(frozen=True)
class Fold:
    arms: dict[str, pd.DataFrame]        # training rows: real, generated, generated + real
    tests: dict[str, pd.DataFrame]       # internal (the pool's test split) and external (the held-out set)
    levers: list[levers.Lever]           # the lever study's settings, the reference (the generated arm) first
    lever_sets: dict[str, pd.DataFrame]  # each lever's generated rows
    scores: pd.DataFrame                 # one row per (model, arm, seed, test image): BUS-DM and Baseline-CLIP

    @property
    def labelled(self) -> pd.DataFrame:
        """`scores` with each arm named by its model too ("BUS-DM · real"): the arms of one table across models."""
        return self.scores.assign(arm=self.scores["model"] + " · " + self.scores["arm"])


def run_fold(held_out: str, pool: str | Path, external: str | Path, runs: str | Path, profile: str,
             seeds: Sequence[int], n_generated: int, sampling: Mapping, seed: int = 0) -> Fold:
    """The fold that holds `held_out` (its manifest: `external`) out of BUSGen's and the models' training, the
    `pool` manifest being the other sets; `n_generated` images sampled with `sampling` make the generated arm.
    Runs under `runs`: busgen/lodo_without_<held_out>[-<variant>], levers/<held_out>, lodo/<held_out>."""
    runs, study = Path(runs), get_study(profile)
    generator = pretrain(pool, profile, runs / "busgen" / f"lodo_without_{held_out}", resume=True, progress=False)
    variants = levers.pretrain_variants(pool, profile, generator, study.lever_generators)
    settings = levers.one_knob_levers(generator, n_generated, sampling, study.lever_images, study.lever_guidance,
                                      variants)
    sets = levers.lever_sets(settings, runs / "levers" / held_out, seed)
    arms, tests = design(pool, external, sets[settings[0].name])
    out = runs / "lodo" / held_out
    bus_dm = score_arms(arms, tests, train_fn("bus-dm", TASK, profile, select_dir=out / "cv"), seeds, out,
                        model_name="BUS-DM", progress=False)
    clip_weights = pretrained_clip(arms[REAL], profile, out / "clip", seed=seed)  # once, for all seeds
    clip = score_arms({REAL: arms[REAL]}, tests,
                      train_fn("baseline-clip", TASK, profile, clip_weights=clip_weights, clip_epochs=0), seeds, out,
                      model_name="Baseline-CLIP", progress=False)
    scores = pd.concat([bus_dm.assign(model="BUS-DM"), clip.assign(model="Baseline-CLIP")], ignore_index=True)
    return Fold(arms, tests, settings, sets, scores)
