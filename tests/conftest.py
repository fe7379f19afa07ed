"""Shared test fixtures: seeds, a clean parameter store, Pyro validation, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

DATA_DIR = Path(os.environ.get("PYRO_EFA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_and_clean() -> None:
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)


@pytest.fixture
def data_dir() -> Path:
    """``../shared/data`` beside the checkout (or $PYRO_EFA_DATA); skips when absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR} (set PYRO_EFA_DATA)")
    return DATA_DIR
