"""Where a run's datasets come from: the phantom for the profile, and the real sets.

Notebooks call these instead of building paths themselves, so every notebook
of one profile reads the same files under `runs/<profile>/data/`, and a
dataset is built once (its parameters are stamped beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

from busgen_lib.profiles import get_profile

# The compact public copies under ../shared/datasets/ (see data_manifests/README.md).
REAL_DATASETS = ("busi", "bus_uclm", "breast_lesions_usg")
STAMP = "dataset.json"


def _is_current(out: Path, params: dict) -> bool:
    stamp = out / STAMP
    return (out / "manifest.csv").exists() and stamp.exists() and json.loads(stamp.read_text()) == params


def _stamp(out: Path, params: dict) -> None:
    (out / STAMP).write_text(json.dumps(params, indent=1))


def phantom_dataset(profile: str, runs_dir: str | Path, seed: int = 0) -> Path:
    """The profile's phantom dataset (rendered on first use, and again when the phantom's rules changed).

    Returns its manifest. The stamp holds the phantom's `PHANTOM_VERSION`, so a
    dataset rendered by an older phantom (other lesions, fewer columns) is
    never reused by newer code.
    """
    from busgen_lib.data.phantom.writer import PHANTOM_VERSION, write_phantom

    p = get_profile(profile)
    out = Path(runs_dir) / "data" / "phantom"
    params = {"n": p.phantom_images, "size": p.phantom_size, "seed": seed, "version": PHANTOM_VERSION}
    if not _is_current(out, params):
        write_phantom(out, n=p.phantom_images, size=p.phantom_size, seed=seed, replace=True)
        _stamp(out, params)
    return out / "manifest.csv"


def real_datasets(datasets_dir: str | Path, runs_dir: str | Path) -> dict[str, Path]:
    """Manifests for the real datasets present under `datasets_dir` (missing ones skipped)."""
    from busgen_lib.data.importers import import_shared

    found = {}
    for name in REAL_DATASETS:
        source = Path(datasets_dir).resolve() / name
        if not (source / "manifest.csv").exists():
            continue
        out = Path(runs_dir) / "data" / name
        params = {"source": str(source.resolve())}
        if not _is_current(out, params):
            import_shared(name, source, out)
            _stamp(out, params)
        found[name] = out / "manifest.csv"
    return found


def phantom_cohorts(profile: str, runs_dir: str | Path, seed: int = 0,
                    held_out: tuple[str, ...] = ("dcis", "tnbc")) -> dict[str, Path]:
    """The profile's phantom cut into a pretraining cohort and one adaptation cohort per held-out subtype.

    Manifests `cohort_<name>.csv` beside the phantom's (same images); returns {name: manifest}.
    """
    from busgen_lib.data.cohorts import split_cohorts
    from busgen_lib.data.manifest import read_manifest, write_manifest

    manifest = phantom_dataset(profile, runs_dir, seed)
    paths = {name: manifest.parent / f"cohort_{name}.csv" for name in ("pretrain", *held_out)}
    params = {"held_out": list(held_out), "source": json.loads((manifest.parent / STAMP).read_text())}
    stamp = manifest.parent / "cohorts.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == params and all(p.exists() for p in paths.values())):
        for name, part in split_cohorts(read_manifest(manifest), held_out).items():
            write_manifest(part, paths[name])
        stamp.write_text(json.dumps(params, indent=1))
    return paths


def few_shot_manifest(manifest: str | Path, n: int, seed: int = 0) -> Path:
    """`n` training images of a cohort (cohorts.few_shot; all of them if it has fewer) as
    `<manifest stem>_<n>shot.csv` beside it."""
    from busgen_lib.data.cohorts import few_shot
    from busgen_lib.data.manifest import read_manifest, write_manifest

    manifest = Path(manifest)
    return write_manifest(few_shot(read_manifest(manifest), n, seed, allow_fewer=True), manifest.with_name(f"{manifest.stem}_{n}shot.csv"))


def real_pool(datasets_dir: str | Path, runs_dir: str | Path, include: tuple[str, ...]) -> Path:
    """The real sets in `include` pooled into one manifest, each set's name as its `device`.

    Each public set comes from its own hospital and scanner mix, so the source
    set is the device condition of a BUSGen pretrained on real data (notebook 07's
    leave-one-dataset-out design). Written once as `runs/<profile>/data/pool_<names>.csv`.
    """
    from busgen_lib.data.manifest import concat_manifests, read_manifest, write_manifest

    manifests = real_datasets(datasets_dir, runs_dir)
    missing = [name for name in include if name not in manifests]
    if missing:
        raise FileNotFoundError(f"real datasets {missing} not found under {datasets_dir}")
    out = Path(runs_dir) / "data" / f"pool_{'+'.join(sorted(include))}.csv"
    params = {"include": sorted(include), "sources": {n: str(manifests[n]) for n in sorted(include)}}
    stamp = out.with_suffix(".json")
    if out.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return out
    parts = []
    for name in sorted(include):
        df = read_manifest(manifests[name])
        df["device"] = name
        parts.append(write_manifest(df, out.with_name(f"{out.stem}_{name}.csv")))
    concat_manifests(parts, out)
    for part in parts:
        part.unlink()
    stamp.write_text(json.dumps(params, indent=1))
    return out
