"""Shared fixtures: small phantom datasets rendered once per test session."""

from pathlib import Path

import pytest

from busgen_lib.data.phantom import write_phantom


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """60 phantom images at 32 px (all pathologies, several devices): enough to train a few steps."""
    return write_phantom(tmp_path_factory.mktemp("phantom") , n=60, size=32, seed=7, progress=False)
