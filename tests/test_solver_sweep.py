"""The solver sweep: its matching rule and knee, its cache, and its quality measures on known inputs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import busgen_lib.experiments.solver_sweep as sweep_module
from busgen_lib.diffusion.checkpoint import load_model
from busgen_lib.diffusion.plan import Request
from busgen_lib.experiments.solver_sweep import CONVERGED, Setting, ancestral, draw, grid, knee, matches, summary

BOX = "box control (centroid in box)"


def table(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    """(sampler, steps, Fréchet distance, pathology accuracy) rows; the box accuracy is always inside its interval."""
    t = pd.DataFrame([{"sampler": s, "order": 2, "steps": n, "precision": "fp32", "nfe": 2 * n, "seconds_per_image": n / 10,
                       "frechet_to_reference": fd, "pathology control": acc, BOX: 0.8,
                       "grey_diff_to_converged": 10 / n} for s, n, fd, acc in rows])
    t.attrs["reference_controls"] = {"pathology control": (0.6, 0.9), BOX: (0.7, 0.9)}
    return t


REFERENCES = [("ddpm", 500, 0.0, 0.75), (CONVERGED.sampler, CONVERGED.steps, 2.0, 0.75)]


def test_a_setting_matches_only_with_a_close_distance_and_every_control_inside_the_reference_interval():
    t = table(REFERENCES + [("unipc", 5, 2.4, 0.75),    # within 1.25 × the floor of 2.0
                            ("unipc", 8, 2.6, 0.75),    # too far
                            ("ddim", 5, 1.0, 0.55)])    # close, but pathology control below the interval
    assert matches(t).tolist() == [True, True, True, False, False]
    assert matches(t, fd_margin=1.5).tolist() == [True, True, True, True, False]


def test_the_knee_is_the_cheapest_matching_grid_setting_never_a_reference():
    t = table(REFERENCES + [("unipc", 5, 9.0, 0.75), ("unipc", 12, 2.1, 0.75), ("ddim", 8, 2.2, 0.7),
                            ("ddim", 20, 1.9, 0.75)])
    chosen = knee(t)
    assert (chosen["sampler"], chosen["steps"]) == ("ddim", 8)
    t.loc[len(t)] = {**t.iloc[-2].to_dict(), "steps": 6, "nfe": 12, "precision": "bf16"}  # cheaper, but bf16
    assert knee(t)["steps"] == 8
    t.loc[len(t)] = {**t.loc[t["sampler"] == "ddim"].iloc[0].to_dict(), "sampler": "unipc", "grey_diff_to_converged": 0.5}
    assert knee(t)["sampler"] == "unipc"  # same evaluations, smaller error against the converged solution
    with pytest.raises(ValueError, match="no setting of the grid matches"):
        knee(table(REFERENCES + [("unipc", 5, 9.0, 0.75)]))
    assert summary(t)["matches"].sum() == 7


def test_grid_and_references():
    settings = grid(steps=(5, 10))
    assert len(settings) == 8 and Setting("ddim", 10, 1) in settings
    assert {s.order for s in settings if s.sampler == "dpmsolver++-singlestep"} == {3}


def test_draw_is_cached_per_model_plan_guidance_and_setting(smoke_model, tmp_path, monkeypatch, one_thread):
    model = load_model(smoke_model)
    requests = [Request(i, 100 + i, p, model.config.device_names[0], [] if p == "normal" else [(0.2, 0.2, 0.6, 0.6)])
                for i, p in enumerate(["normal", "benign", "malignant"])]
    setting = Setting("dpmsolver++", 3, 2)
    first, _ = draw(model, requests, setting, 1.8, tmp_path, "weights-a")
    calls = []
    real = sweep_module.sample_images
    monkeypatch.setattr(sweep_module, "sample_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = draw(model, requests, setting, 1.8, tmp_path, "weights-a")
    assert calls == [] and torch.equal(first, again)
    # the cache stores the quantised files' pixels: the same values a fresh draw returns
    assert torch.equal(first, torch.round((first + 1) * 127.5) / 127.5 - 1)
    draw(model, requests, setting, 0.5, tmp_path, "weights-a")
    draw(model, requests, setting, 1.8, tmp_path, "weights-b")
    assert len(calls) == 2
    assert ancestral(model) == Setting("ddpm", model.config.num_train_timesteps, 1)


def test_quality_of_the_reference_against_itself_is_perfect_and_differences_are_in_grey_levels(monkeypatch):
    class Features(torch.nn.Module):
        num_features = 4

        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0], x[:, 0, -1, -1]], 1).double()

    class Probes:
        size = 8
        pathology = type("P", (), {"model": None})()

        def evaluate(self, frame, images):
            return []

    monkeypatch.setattr(sweep_module, "ProbeFeatures", lambda network: Features())
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    row = sweep_module.quality(images, [], Probes(), images, images - 2 / 127.5)
    assert abs(row["frechet_to_reference"]) < 1e-6
    assert row["grey_diff_to_reference"] == 0.0
    assert row["grey_diff_to_converged"] == pytest.approx(2.0)
    shifted = sweep_module.quality((images + 0.5).clamp(-1, 1), [], Probes(), images, images)
    assert shifted["frechet_to_reference"] > 0.05
