"""Generation plans are balanced and deterministic; sharded generation resumes without gaps or duplicates."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busgen_lib.data.manifest import read_manifest
from busgen_lib.data.schema import PATHOLOGIES, format_boxes, parse_boxes
from busgen_lib.diffusion.box_prior import BoxPrior
from busgen_lib.diffusion.generate import IMAGE_DIR, generate, merge_shards, read_plan, shard_path
from busgen_lib.diffusion.plan import Request, balanced_cell, balanced_plan, explicit_plan, validate_plan

DEVICES = ("dev-a", "dev-b", "dev-c")
ROOT = Path(__file__).resolve().parents[1]
SIZE = 12


def make_prior() -> BoxPrior:
    rng = np.random.default_rng(0)
    centres = rng.uniform(0.3, 0.7, (60, 2))
    sizes = rng.uniform(0.1, 0.3, (60, 2))
    boxes = [[[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]] for (cx, cy), (w, h) in zip(centres, sizes)]
    return BoxPrior.fit(pd.DataFrame({"pathology": ["benign", "malignant"] * 30, "boxes": map(format_boxes, boxes)}))


def make_plan(n: int = 23, seed: int = 7) -> list[Request]:
    return balanced_plan(n, PATHOLOGIES, DEVICES, make_prior(), seed)


def fake_image(request: Request) -> np.ndarray:
    """Noise from the request's seed, with its boxes drawn white: content a test can recompute."""
    image = np.random.default_rng(request.seed).integers(0, 200, (SIZE, SIZE), dtype=np.uint8)
    for x0, y0, x1, y1 in request.boxes:
        image[int(y0 * SIZE):int(np.ceil(y1 * SIZE)), int(x0 * SIZE):int(np.ceil(x1 * SIZE))] = 255
    return image


def fake_sample(requests: list[Request]) -> np.ndarray:
    return np.stack([fake_image(r) for r in requests])


def failing_after(batches: int):
    """A sampler that dies on its (batches+1)-th call, like a killed job."""
    calls = Counter()

    def sample(requests: list[Request]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt("killed")
        return fake_sample(requests)
    return sample


def snapshot(out_dir: Path) -> dict[str, bytes]:
    """Every output file's bytes, shard parts aside (their row order depends on how the run went)."""
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted(out_dir.rglob("*"))
            if p.is_file() and p.parent.name != "shards"}


@pytest.fixture(scope="module")
def plan() -> list[Request]:
    return make_plan()


@pytest.fixture(scope="module")
def reference(plan, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference")
    generate(plan, fake_sample, out, batch_size=4, progress=False)
    merge_shards(out)
    return snapshot(out)


# --------------------------------------------------------------------------- plans

def test_balanced_plan_counts_per_cell_differ_by_at_most_one():
    for n in (1, 7, 9, 23, 40):
        cells = Counter((r.pathology, r.device) for r in make_plan(n))
        counts = [cells[(p, d)] for p in PATHOLOGIES for d in DEVICES]
        assert max(counts) - min(counts) <= 1, n


@pytest.mark.parametrize("n_pathologies,n_devices", [(3, 3), (3, 18), (2, 4), (3, 19)])
def test_every_prefix_is_balanced_in_pathology_and_covers_all_cells(n_pathologies, n_devices):
    cells = [balanced_cell(i, n_pathologies, n_devices) for i in range(3 * n_pathologies * n_devices)]
    assert len(set(cells[:n_pathologies * n_devices])) == n_pathologies * n_devices
    for end in range(1, len(cells)):
        counts = Counter(p for p, _ in cells[:end])
        assert max(counts.values()) - min(counts.get(p, 0) for p in range(n_pathologies)) <= 1


def test_plan_is_deterministic_and_prefix_stable(plan):
    assert make_plan(23) == plan
    assert make_plan(10)[:5] == make_plan(5)
    assert make_plan(23, seed=8) != plan


def test_requests_have_distinct_seeds_and_valid_boxes(plan):
    assert len({r.seed for r in plan}) == len(plan)
    validate_plan(plan, DEVICES)
    assert all(bool(r.boxes) == (r.pathology != "normal") for r in plan)


def test_unknown_pathology_or_device_is_named_with_the_valid_values():
    with pytest.raises(ValueError, match="unknown pathologies 'cyst'; choose from normal, benign, malignant"):
        balanced_plan(4, ["cyst"], DEVICES, make_prior(), 0)
    with pytest.raises(ValueError, match="unknown devices 'dev-z'; choose from dev-a, dev-b, dev-c"):
        balanced_plan(4, PATHOLOGIES, ["dev-z"], make_prior(), 0, known_devices=DEVICES)


def test_lesion_pathologies_need_a_box_prior():
    with pytest.raises(ValueError, match="no box prior was given"):
        balanced_plan(4, ["benign"], DEVICES, None, 0)
    assert all(r.boxes == [] for r in balanced_plan(4, ["normal"], DEVICES, None, 0))


def test_explicit_plan_reads_a_csv_and_fills_missing_boxes_from_the_prior(tmp_path):
    path = tmp_path / "requests.csv"
    pd.DataFrame({"pathology": ["benign", "normal", "malignant"], "device": ["dev-a", "dev-b", "dev-c"],
                  "boxes": ["[[0.1, 0.2, 0.3, 0.4]]", "", ""], "seed": ["5", "", ""]}).to_csv(path, index=False)
    plan = explicit_plan(path, DEVICES, seed=3, box_prior=make_prior())
    assert [r.index for r in plan] == [0, 1, 2]
    assert plan[0].boxes == [(0.1, 0.2, 0.3, 0.4)] and plan[0].seed == 5
    assert plan[1].boxes == [] and plan[2].boxes
    assert plan == explicit_plan(path, DEVICES, seed=3, box_prior=make_prior())


def test_explicit_plan_names_every_bad_row_and_field():
    rows = pd.DataFrame({"pathology": ["benign", "cyst", "normal", "benign"],
                         "device": ["dev-a", "dev-a", "dev-q", "dev-a"],
                         "boxes": ["[[0.1, 0.2, 1.3, 0.4]]", "[]", "", "[[0.1, 0.2]]"]})
    with pytest.raises(ValueError) as err:
        explicit_plan(rows, DEVICES)
    message = str(err.value)
    assert "4 problem(s)" in message
    assert "row 1, boxes: box 0 has coordinates outside 0..1" in message
    assert "row 2, pathology: unknown 'cyst'; use one of normal, benign, malignant" in message
    assert "row 3, device: unknown 'dev-q'; the model knows dev-a, dev-b, dev-c" in message
    assert "row 4, boxes: box 0 must be a list of four numbers" in message


def test_explicit_lesion_rows_without_boxes_need_a_prior():
    rows = pd.DataFrame({"pathology": ["benign"], "device": ["dev-a"]})
    with pytest.raises(ValueError, match="rows without boxes need lesion boxes for benign"):
        explicit_plan(rows, DEVICES)


def test_validate_plan_names_the_request_and_field(plan):
    bad = [*plan[:3], Request(3, 1, "benign", "dev-a", [(0.5, 0.5, 0.4, 0.6)])]
    with pytest.raises(ValueError, match=r"request 3, boxes: box 0 has x0 >= x1"):
        validate_plan(bad, DEVICES)


# --------------------------------------------------------------------------- generation

def test_output_lists_every_request_once_with_its_seeded_image(plan, tmp_path):
    generate(plan, fake_sample, tmp_path, batch_size=4, progress=False)
    manifest = read_manifest(merge_shards(tmp_path))
    assert manifest["index"].astype(int).tolist() == list(range(len(plan)))
    for request, (_, row) in zip(plan, manifest.iterrows()):
        image = np.asarray(Image.open(tmp_path / row["image"]))
        np.testing.assert_array_equal(image, fake_image(request))
        assert (row["pathology"], row["device"], int(row["seed"])) == (request.pathology, request.device, request.seed)
        np.testing.assert_allclose(parse_boxes(row["boxes"]), request.boxes, atol=1e-6)
        assert row["patient_id"] == f"gen-{request.index}" and row["split"] == "train"
    assert read_plan(tmp_path) == plan


def test_kill_and_resume_gives_the_uninterrupted_output(plan, reference, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        generate(plan, failing_after(2), tmp_path, batch_size=4, progress=False)
    listed = pd.read_csv(shard_path(tmp_path, 0, 1))
    assert len(listed) == 8 and all((tmp_path / image).exists() for image in listed["image"])
    calls = []
    generate(plan, lambda rs: calls.append(len(rs)) or fake_sample(rs), tmp_path, batch_size=4, progress=False)
    assert sum(calls) == len(plan) - 8  # only the unfinished requests are sampled again
    merge_shards(tmp_path)
    assert snapshot(tmp_path) == reference


def test_an_image_without_its_row_is_regenerated_and_listed(plan, reference, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        generate(plan, failing_after(1), tmp_path, batch_size=4, progress=False)
    orphan = tmp_path / "images" / f"{4:08d}.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(orphan)  # killed between image and row
    part = shard_path(tmp_path, 0, 1)
    part.write_bytes(part.read_bytes() + b"images/00000004.png,gen-4,gen")  # and mid-way through its row
    generate(plan, fake_sample, tmp_path, batch_size=4, progress=False)
    merged = pd.read_csv(merge_shards(tmp_path))
    assert merged["index"].tolist() == list(range(len(plan)))
    assert snapshot(tmp_path) == reference


def test_shards_run_one_after_another_merge_to_the_single_process_output(plan, reference, tmp_path):
    parts = [generate(plan, fake_sample, tmp_path, batch_size=3, shard_index=k, num_shards=4, progress=False)
             for k in range(4)]
    indices = [set(pd.read_csv(p)["index"]) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(indices) for b in indices[i + 1:])
    merge_shards(tmp_path)
    assert snapshot(tmp_path) == reference


def test_merge_refuses_an_incomplete_run(plan, tmp_path):
    generate(plan, fake_sample, tmp_path, batch_size=4, shard_index=0, num_shards=2, progress=False)
    with pytest.raises(ValueError, match=r"11 of 23 requests are not generated yet \(first: \[1, 3, 5"):
        merge_shards(tmp_path)


def test_resuming_with_a_different_plan_names_the_field(plan, tmp_path):
    generate(plan[:4], fake_sample, tmp_path, batch_size=4, progress=False)
    other = make_plan(4, seed=8)
    with pytest.raises(ValueError, match=r"request 0 differs in 'seed'.*fresh --out"):
        generate(other, fake_sample, tmp_path, batch_size=4, progress=False)
    moved = [*plan[:3], Request(3, plan[3].seed, plan[3].pathology, "dev-c", plan[3].boxes)]
    with pytest.raises(ValueError, match=r"request 3 differs in 'device' \(stored 'dev-b', given 'dev-c'\)"):
        generate(moved, fake_sample, tmp_path, batch_size=4, progress=False)
    generate(plan[:8], fake_sample, tmp_path, batch_size=4, progress=False)  # grown: a longer plan, same start
    with pytest.raises(ValueError, match=r"holds a plan of 8 requests but 4 were given \(a set can grow, not shrink"):
        generate(plan[:4], fake_sample, tmp_path, batch_size=4, progress=False)


def test_a_grown_plan_keeps_its_first_images_and_equals_a_fresh_run(plan, tmp_path):
    generate(plan, fake_sample, tmp_path / "fresh", batch_size=4, progress=False)
    generate(plan[:10], fake_sample, tmp_path / "grown", batch_size=4, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "grown" / IMAGE_DIR).iterdir()}
    calls = []
    generate(plan, lambda requests: calls.extend(r.index for r in requests) or fake_sample(requests),
             tmp_path / "grown", batch_size=4, progress=False)
    assert sorted(calls) == list(range(10, 23))  # only the new requests are sampled
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "grown" / IMAGE_DIR).iterdir()
            if p.name in first} == first
    assert snapshot(tmp_path / "grown") == snapshot(tmp_path / "fresh")


def test_resuming_with_another_shard_count_is_refused(plan, tmp_path):
    generate(plan[:8], fake_sample, tmp_path, batch_size=4, shard_index=0, num_shards=2, progress=False)
    with pytest.raises(ValueError, match="2 processes"):
        generate(plan[:8], fake_sample, tmp_path, batch_size=4, shard_index=0, num_shards=3, progress=False)


def test_a_sampler_returning_the_wrong_shape_is_a_clear_error(plan, tmp_path):
    with pytest.raises(ValueError, match=r"it must return uint8 grey images of shape \(4, H, W\)"):
        generate(plan, lambda rs: np.zeros((len(rs), SIZE, SIZE), np.float32), tmp_path, batch_size=4,
                 progress=False)


def test_an_unknown_image_format_is_refused_before_sampling(plan, tmp_path):
    with pytest.raises(ValueError, match=r"cannot write images as \.xyz"):
        generate(plan, failing_after(0), tmp_path, batch_size=4, image_ext="xyz", progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_matches_single_process(reference, tmp_path):
    script = tmp_path / "launch_generate.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_generate import fake_sample, make_plan
        from busgen_lib.diffusion.generate import generate_distributed
        generate_distributed(make_plan(), fake_sample, sys.argv[1], batch_size=3)
    """))
    out = tmp_path / "out"
    # `--cpu` alone starts a single process; the torchrun launcher (`--multi_gpu`) plus
    # ACCELERATE_USE_CPU gives two processes joined by a gloo group on a CPU-only machine.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted(p.name for p in (out / "shards").iterdir())
    assert parts == ["shard-0-of-2.csv", "shard-1-of-2.csv"]
    assert {i % 2 for i in pd.read_csv(out / "shards" / parts[1])["index"]} == {1}
    assert snapshot(out) == reference
