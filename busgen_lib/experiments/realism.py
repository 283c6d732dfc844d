"""Fig 2 for one trained BUSGen: generated arms, a real-data encoder, privacy/realism measures (notebook 04).

Joins `diffusion.pipeline` (the images, sampled as every dataset is),
`experiments.memorisation.domain_features` (the encoder, trained on the real
training images only, so that generated and held-out real images are equally
new to it) and `evaluate.realism` (the measures and the two-sample test).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from busgen_lib.data.dataset import load_images
from busgen_lib.data.manifest import read_manifest, write_manifest
from busgen_lib.diffusion import pipeline
from busgen_lib.diffusion.generate import MANIFEST_FILE, SETTINGS_FILE
from busgen_lib.errors import DataError
from busgen_lib.evaluate.realism import Realism, TwoSampleTest, measure_realism, two_sample_test
from busgen_lib.experiments.memorisation import domain_features

PLAIN, CPSAMPLE = "without CPSample", "with CPSample"


def generated_arms(model_dir: str | Path, n: int, out: str | Path, cpsample_dir: str | Path | None = None,
                   seed: int = 0, **sampling) -> tuple[dict[str, pd.DataFrame], str]:
    """({arm: manifest frame}, note): `n` images sampled without CPSample into `out`, and, when `cpsample_dir`
    holds a dataset sampled from the same model with CPSample and the same seed and settings (notebook 03's
    `synthetic/base`), its first `n` rows — the same requests, so the two arms differ only by CPSample.

    The note says why the CPSample arm is missing, if it is.
    """
    plain = pipeline.sample_dataset(model_dir, n, out, seed=seed, **sampling)
    arms = {PLAIN: read_manifest(plain)}
    if cpsample_dir is None:
        return arms, "CPSample arm: not sampled for this model"
    cpsample_dir = Path(cpsample_dir)
    if not (cpsample_dir / MANIFEST_FILE).exists():
        return arms, f"CPSample arm: {cpsample_dir} not found (run notebook 03)"
    ours, theirs = (json.loads((Path(d) / SETTINGS_FILE).read_text()) for d in (out, cpsample_dir))
    differ = [k for k in ours if k != "cond_fn" and ours[k] != theirs.get(k)]
    if differ or not theirs.get("cond_fn"):
        why = f"other {', '.join(differ)}" if differ else "no CPSample"
        return arms, f"CPSample arm: {cpsample_dir} was sampled with {why}; rerun notebook 03"
    cpsample = read_manifest(cpsample_dir / MANIFEST_FILE)
    if len(cpsample) < n:
        return arms, f"CPSample arm: {cpsample_dir} has {len(cpsample)} images, fewer than {n}"
    cpsample = cpsample.iloc[:n]
    same = sum(np.array_equal(a, b) for a, b in zip(_pixels(arms[PLAIN]), _pixels(cpsample)))
    return arms | {CPSAMPLE: cpsample}, (f"CPSample arm: the first {n} images of {cpsample_dir}, {same} of them "
                                         "identical to the arm without (CPSample did not act on those)")


def _pixels(df: pd.DataFrame) -> list[np.ndarray]:
    """The stored pixels of a manifest frame's images (PNG, lossless), to tell which CPSample changed."""
    return [np.asarray(Image.open(Path(df.attrs["root"]) / image)) for image in df["image"]]


@dataclass
class RealismStudy:
    """The measures of every arm, its two-sample test, and the images they were computed on."""

    realism: Realism
    two_sample: dict[str, TwoSampleTest]
    training: torch.Tensor
    images: dict[str, torch.Tensor]   # per arm, and "real hold-out"

    def table(self) -> pd.DataFrame:
        """`realism.table` with the two-sample AUC and its 95% CI per arm."""
        auc = pd.DataFrame([{"arm": a, "two_sample_auc": t.auc, "auc_ci_lo": t.ci[0], "auc_ci_hi": t.ci[1]}
                            for a, t in self.two_sample.items()])
        return self.realism.table.merge(auc, on="arm", how="left")


def realism_study(manifest: str | Path, arms: Mapping[str, pd.DataFrame], out: str | Path, *, size: int,
                  probe_size: int, encoder_epochs: int, classifier_epochs: int, folds: int = 5, k: int = 3,
                  seed: int = 0) -> RealismStudy:
    """Measure each generated arm against the `train` split of `manifest`, with its `test` split (other
    patients) as the new-real reference.

    The encoder (`domain_features`, a pathology CNN at `size` px) learns from
    the training images only. The two-sample test (`probes.SmallCNN` at
    `probe_size` px, `folds`-fold, grouped by patient) compares each arm, and
    the held-out real images, with as many training images drawn at random:
    the hold-out row shows what the test gives when both sets are real.
    """
    df = read_manifest(manifest)
    train_df, holdout_df = df[df["split"] == "train"], df[df["split"] == "test"]
    if train_df.empty or holdout_df.empty:
        raise DataError(f"{manifest}: needs train and test rows (the test split's patients are the new-real "
                        f"reference); found {len(train_df)} train and {len(holdout_df)} test rows")
    encoder_manifest = write_manifest(train_df, Path(out) / "encoder_manifest.csv")
    features = domain_features(encoder_manifest, size, epochs=encoder_epochs, seed=seed)
    sets = {**arms, "real hold-out": holdout_df}
    images = {name: load_images(frame, size) for name, frame in sets.items()}
    training = load_images(train_df, size)
    measures = measure_realism({a: images[a] for a in arms}, training, images["real hold-out"], features, k)
    rng = np.random.default_rng(seed)
    two_sample = {}
    for name, frame in sets.items():
        real = train_df.iloc[np.sort(rng.choice(len(train_df), min(len(frame), len(train_df)), replace=False))]
        two_sample[name] = two_sample_test(
            load_images(real, probe_size), load_images(frame, probe_size), real["patient_id"].tolist(),
            frame["patient_id"].tolist(), folds=folds, epochs=classifier_epochs, seed=seed)
    return RealismStudy(measures, two_sample, training, images)
