"""Shared test fixtures: seeds, a clean parameter store, Pyro validation, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

from pyro_efa import EFAData

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


@pytest.fixture
def counts() -> EFAData:
    """60 units of Poisson counts over 8 keys, ragged lengths 1-6."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        n = rng.integers(1, 7)
        for i, k in enumerate(rng.choice(8, size=n, replace=False)):
            rows.append((u, int(k), i, int(rng.poisson(1 + k % 3))))
    df = pd.DataFrame(rows, columns=["user", "item", "t", "count"])
    return EFAData.from_pandas(df, unit="user", key="item", value="count", order="t")
