"""Shared fixtures: small phantom datasets rendered once per test session."""

from pathlib import Path

import pytest
import torch

from busgen_lib.data.phantom import write_phantom


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """60 phantom images at 32 px (all pathologies, several devices): enough to train a few steps."""
    return write_phantom(tmp_path_factory.mktemp("phantom") , n=60, size=32, seed=7, progress=False)


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """400 phantom images at 32 px (seed 3): enough malignant subtypes and patients for judges and classifiers."""
    return write_phantom(tmp_path_factory.mktemp("small_phantom"), n=400, size=32, seed=3, progress=False)


@pytest.fixture(scope="session")
def smoke_model(tiny_phantom, tmp_path_factory) -> Path:
    """A smoke-profile model folder trained for a few steps on `tiny_phantom` (weights barely matter)."""
    from busgen_lib.diffusion.train import pretrain

    out = tmp_path_factory.mktemp("smoke_run")
    return pretrain(tiny_phantom, "smoke", out, train_overrides={"steps": 2, "batch_size": 4}, progress=False)


@pytest.fixture
def one_thread():
    """One intra-op thread: for tiny nets on a shared 2-core machine a second OpenMP thread only spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
