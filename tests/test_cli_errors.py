"""Issue 14: bad input is refused before the work starts, as one line `busgen: error: ...`.

Each CLI case runs `python -m busgen_lib` as a subprocess and checks the exit
status (2: options, 1: data) and the one message line; argparse's own usage
errors keep argparse's format (usage line + error line, status 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from busgen_lib.data.schema import REQUIRED_COLUMNS
from manifest_fixtures import clean_manifest, noise, write_png

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: object, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "BUSGEN_DEBUG"}
    environment.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "busgen_lib", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=REPO)


def one_line(result: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """The single `busgen: error:` line of a failed run, after checking status, line count and words."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and lines[0].startswith("busgen: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def usage_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """argparse's refusal: status 2, its last line `... error: argument ...`."""
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error: argument" in last and all(w in last for w in words), result.stderr
    return last


# --------------------------------------------------------------------------- option values

@pytest.mark.parametrize("args, words", [
    (["sample", "--model", "m", "--out", "o", "--n", "2", "--guidance", "nan"], ["--guidance", "finite", "nan"]),
    (["sample", "--model", "m", "--out", "o", "--n", "2", "--guidance", "inf"], ["--guidance", "inf"]),
    (["sample", "--model", "m", "--out", "o", "--n", "2", "--steps", "-3"], ["--steps", "at least 1, got -3"]),
    (["sample", "--model", "m", "--out", "o", "--n", "2", "--seed", "-1"], ["--seed", "seed is an integer >= 0"]),
    (["pretrain", "--manifest", "m.csv", "--out", "o", "--steps", "0"], ["--steps", "at least 1, got 0"]),
    (["pretrain", "--manifest", "m.csv", "--out", "o", "--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["pretrain", "--manifest", "m.csv", "--out", "o", "--profile", "fast"], ["--profile", "invalid choice"]),
    (["protect", "--model", "m", "--manifest", "m.csv", "--out", "o", "--steps", "0"], ["--steps", "at least 1"]),
    (["clean", "g.csv", "--real", "r.csv", "--confidence", "2"], ["--confidence", "probability in (0, 1]"]),
    (["clean", "g.csv", "--real", "r.csv", "--size", "0"], ["--size", "at least 1"]),
    (["phantom", "--n", "0", "--out", "o"], ["--n", "at least 1"]),
])
def test_bad_option_values_are_refused_by_the_parser(args, words):
    usage_error(run_cli(*args), *words)


def test_sample_without_n_is_refused(tmp_path):
    one_line(run_cli("sample", "--model", tmp_path, "--out", tmp_path / "o"), 2, "sample needs --n")


def test_notebooks_on_a_folder_without_notebooks_is_refused(tmp_path):
    one_line(run_cli("notebooks", "--profile", "smoke", "--repo", tmp_path), 2, "no numbered notebooks", "--repo")


@pytest.mark.parametrize("size", [1, 7])
def test_phantom_of_degenerate_size_is_refused(tmp_path, size):
    one_line(run_cli("phantom", "--n", 2, "--size", size, "--out", tmp_path / "p"), 2,
             f"--size {size} is too small", "at least 32 px")
    assert not (tmp_path / "p").exists()


def test_phantom_over_an_existing_dataset_is_refused(tmp_path):
    clean_manifest(tmp_path)
    before = sorted(p.name for p in (tmp_path / "images").iterdir())
    one_line(run_cli("phantom", "--n", 2, "--size", 32, "--out", tmp_path), 2, "already holds a dataset",
             "manifest.csv, images, masks")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == before


def test_out_onto_a_file_is_refused(tmp_path):
    manifest = clean_manifest(tmp_path)
    target = tmp_path / "a_file"
    target.write_text("x")
    one_line(run_cli("pretrain", "--manifest", manifest, "--profile", "smoke", "--out", target), 2,
             f"{target}: --out must be a folder")


def test_an_adapter_name_peft_cannot_take_is_refused(tmp_path):
    one_line(run_cli("adapt", "--model", tmp_path, "--manifest", "m.csv", "--adapter", "dcis.v2", "--out",
                     tmp_path / "o"), 2, "--adapter 'dcis.v2' cannot name an adapter")


# --------------------------------------------------------------------------- data, before the work

def _normal_only_manifest(root: Path) -> Path:
    rows = []
    for i in range(4):
        write_png(root / "images" / f"n{i}.png", noise(i, 32, 32))
        row = dict.fromkeys(REQUIRED_COLUMNS, "")
        row.update(image=f"images/n{i}.png", patient_id=f"P{i}", split="train", pathology="normal", boxes="[]",
                   device="dev1")
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_pretrain_on_normal_images_only_fails_before_training(tmp_path):
    manifest = _normal_only_manifest(tmp_path)
    one_line(run_cli("pretrain", "--manifest", manifest, "--profile", "smoke", "--out", tmp_path / "run",
                     "--steps", 2, "--batch-size", 2), 1,
             f"{manifest}: the train split has no benign or malignant rows with boxes", "{'normal': 4}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_png_is_named_by_validate(tmp_path):
    manifest = clean_manifest(tmp_path)
    image = tmp_path / "images" / "b.png"
    image.write_bytes(image.read_bytes()[:120])
    result = run_cli("validate", manifest)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(f"{manifest}:row 2:image: cannot read {image}")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_validate_refuses_a_fifo_device_or_folder_at_once(tmp_path, kind):
    manifest = clean_manifest(tmp_path)
    image = tmp_path / "images" / "c.png"
    image.unlink()
    if kind == "fifo":
        os.mkfifo(image)
    elif kind == "device":
        image.symlink_to("/dev/zero")
    else:
        image.mkdir()
    result = run_cli("validate", manifest, timeout=60)  # a FIFO opened for reading would block: timeout fails
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{manifest}:row 3:image: {image}")
    assert ("is a folder" if kind == "folder" else "not a regular file") in first


def test_import_folder_refuses_a_mistyped_relative_box_naming_its_row(tmp_path):
    for name in ("a", "b", "c"):
        write_png(tmp_path / "imgs" / f"{name}.png", noise(ord(name), 30, 40))
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "patient_id": ["P1", "P2", "P3"],
                  "pathology": ["benign", "benign", "malignant"],
                  "boxes": ["[[0.1, 0.1, 0.5, 0.5]]", "[[0.2, 0.1, 1.02, 0.5]]", "[[0.3, 0.3, 0.6, 0.6]]"]}
                 ).to_csv(labels, index=False)
    one_line(run_cli("import", "folder", tmp_path / "imgs", "--labels", labels, "--out", tmp_path / "out"), 1,
             f"{labels}:row 2:boxes: boxes look like pixels", "2 other row(s) look like relative",
             "--box-units pixel or --box-units relative")
    assert not (tmp_path / "out" / "manifest.csv").exists()
    # Stating the unit decides it: as relative, the 1.02 is then an out-of-range coordinate, named too.
    one_line(run_cli("import", "folder", tmp_path / "imgs", "--labels", labels, "--out", tmp_path / "out",
                     "--box-units", "relative"), 1, f"{labels}:row 2:boxes: box 0 has coordinates outside 0..1")


def test_clean_checks_its_inputs_before_training_the_judge(tmp_path):
    real = clean_manifest(tmp_path)
    one_line(run_cli("clean", tmp_path / "missing.csv", "--real", real), 1,
             f"{tmp_path / 'missing.csv'}: generated manifest not found")
    one_line(run_cli("clean", real, "--real", real, "--column", "lesion_kind"), 2,
             "no column 'lesion_kind' for --column")
    single = pd.read_csv(real, dtype=str, keep_default_na=False)
    single["subtype"] = "idc"
    single.to_csv(tmp_path / "one_class.csv", index=False)
    one_line(run_cli("clean", real, "--real", tmp_path / "one_class.csv", "--column", "subtype"), 1,
             "the judge needs at least two subtype classes", "found ['idc']")


# --------------------------------------------------------------------------- model folders

def test_protect_refuses_an_empty_train_split(tmp_path, smoke_model):
    manifest = clean_manifest(tmp_path)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df["split"] = "test"
    df.to_csv(manifest, index=False)
    one_line(run_cli("protect", "--model", smoke_model, "--manifest", manifest, "--out", tmp_path / "c"), 1,
             f"{manifest}: no rows with split = train (5 rows in all)")


def test_unreadable_safetensors_are_named(tmp_path, smoke_model):
    from busgen_lib.diffusion.checkpoint import WEIGHTS_FILE

    model = tmp_path / "model"
    shutil.copytree(smoke_model, model)
    (model / WEIGHTS_FILE).write_bytes(b"not safetensors at all")
    line = one_line(run_cli("sample", "--model", model, "--n", 2, "--out", tmp_path / "o"), 1,
                    f"{model / WEIGHTS_FILE}: cannot read the weights")
    assert "copy it again or retrain" in line
    debug = run_cli("--debug", "sample", "--model", model, "--n", 2, "--out", tmp_path / "o")
    assert "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1] == line
    env_debug = run_cli("sample", "--model", model, "--n", 2, "--out", tmp_path / "o", env={"BUSGEN_DEBUG": "1"})
    assert "Traceback" in env_debug.stderr and env_debug.returncode == 1


def test_sample_single_pathology_and_devices_from_the_cli(tmp_path, smoke_model):
    from busgen_lib.data.manifest import read_manifest
    from busgen_lib.diffusion.checkpoint import read_config

    device = read_config(smoke_model)["device_names"][0]
    result = run_cli("sample", "--model", smoke_model, "--n", 2, "--out", tmp_path / "o", "--steps", 1,
                     "--pathologies", "malignant", "--devices", device)
    assert result.returncode == 0, result.stderr
    df = read_manifest(tmp_path / "o" / "manifest.csv")
    assert df["pathology"].tolist() == ["malignant", "malignant"] and set(df["device"]) == {device}
    one_line(run_cli("sample", "--model", smoke_model, "--n", 2, "--out", tmp_path / "o2", "--devices", "dev-x"),
             2, "unknown devices 'dev-x'; choose from")
    # A rerun into the same folder with another guidance is refused, naming the difference.
    one_line(run_cli("sample", "--model", smoke_model, "--n", 2, "--out", tmp_path / "o", "--steps", 1,
                     "--pathologies", "malignant", "--devices", device, "--guidance", "0.5"), 2,
             "was sampled with other settings: guidance (stored 1.8, given 0.5)")


def test_sample_speed_options_from_the_cli(tmp_path, smoke_model):
    import json

    from busgen_lib.cli import PRECISIONS
    from busgen_lib.diffusion import speed

    assert PRECISIONS == speed.PRECISIONS
    args = ("sample", "--model", smoke_model, "--n", 2, "--out", tmp_path / "o", "--steps", 1, "--threads", 1)
    result = run_cli(*args, "--precision", "bf16", "--channels-last")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["precision"] == "bf16"
    one_line(run_cli(*args), 2, "was sampled with other settings: precision (stored 'bf16', given 'fp32')")


# --------------------------------------------------------------------------- --help

def test_every_option_has_help_and_profile_is_a_choice():
    from busgen_lib.cli import build_parser
    from busgen_lib.profiles import PROFILES

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.dest == "profile":
                assert list(action.choices) == list(PROFILES)
    help_text = commands["sample"].format_help()
    assert "(default: 16)" in help_text and "(default: balanced)" in help_text and "(default: None)" not in help_text
    result = run_cli("pretrain", "--help")
    assert result.returncode == 0 and "{smoke,demo,paper}" in result.stdout


def test_cpsample_defaults_in_help_are_the_library_defaults():
    from busgen_lib.cli import build_parser
    from busgen_lib.diffusion.privacy import DEFAULT_ALPHA, DEFAULT_SCALE

    text = " ".join(next(a for a in build_parser()._actions if a.dest == "command").choices["sample"]
                    .format_help().split())
    assert f"CPSample's, {DEFAULT_ALPHA:g})" in text and f"CPSample's, {DEFAULT_SCALE:g})" in text
