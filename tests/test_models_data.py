"""The ready models in models/: loaders on the real files and a smoke run of every script.

The loader tests read ``../shared/data`` (or $PYRO_EFA_DATA) and skip when it is absent. The counts
are SPEC section 2's. MovieLens: the 50th most-rated place is a tie of two movies in both tasks;
breaking it by the smaller movie id reproduces SPEC's counts exactly (902 users / 13,757 ratings,
893 / 12,465); the other choice gives 901 / 13,757 and 892 / 12,439. Which rating survives step (3)
(one per user and time stamp) is random but does not change the counts. Instacart and temperature
counts are exact.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_efa import EFAConfig, FitOptions, models
from pyro_efa.models import instacart, movielens, synthetic, temperature

MODELS = Path(__file__).resolve().parents[1] / "models"
_MODULES = {
    "synthetic": synthetic,
    "instacart": instacart,
    "movielens": movielens,
    "temperature": temperature,
}


def _module(name: str):
    return _MODULES[name]


@functools.cache
def _load(name: str, loader: str, data_dir: Path | None, **kwargs):
    args = () if data_dir is None else (data_dir,)
    return getattr(_module(name), loader)(*args, **kwargs)


def _check_split(splits, expected_units: int | None = None) -> None:
    labels = [set(d.unit_labels) for d in splits]
    for i in range(len(labels)):
        assert len(labels[i]) == len(splits[i])
        for j in range(i + 1, len(labels)):
            assert not labels[i] & labels[j], "splits share units"
    if expected_units is not None:
        assert sum(map(len, labels)) == expected_units
    for d in splits:  # each split is a data set of its own
        assert d.num_units == len(d)
        assert torch.equal(d.unit_index, torch.arange(len(d)))


# ------------------------------------------------------------------------------------------------
# loaders
def test_synthetic_split():
    train, val, test = _load("synthetic", "load", None)
    _check_split((train, val, test), 10_000)
    assert (len(train), len(val), len(test)) == (5_625, 1_875, 2_500)
    assert set(test.unit_labels) == set(range(7_501, 10_001))  # users 7,501-10,000
    assert all(d.num_observations == 5 * len(d) for d in (train, val, test))


@pytest.mark.parametrize(
    "loader, users, ratings",
    [("load_items", 902, 13_757), ("load_ratings", 893, 12_465)],
)
def test_movielens_counts(data_dir, loader, users, ratings):
    splits = _load("movielens", loader, data_dir)
    _check_split(splits, users)  # exact (see the module docstring)
    assert sum(d.num_observations for d in splits) == ratings
    train, val, test = splits
    assert len(test) == users - int(0.75 * users)  # 25% of users test
    assert len(val) == len(train) + len(val) - int(0.75 * (len(train) + len(val)))  # 25% of the rest
    if loader == "load_items":
        assert all(len(d.items) == 50 for d in splits)
    else:
        assert all(len(d.keys) == 50 for d in splits)
        values = torch.cat([d.values[d.mask] for d in splits])
        assert set(values.tolist()) == {0.0, 1.0, 2.0}  # rating - 1 after the recoding
        assert all(int(d.lengths.min()) >= 2 for d in splits)  # single-rating users dropped


def test_movielens_one_rating_per_timestamp(data_dir):
    df = _module("movielens").read_ratings(data_dir)
    kept = _module("movielens").filter_ratings(df, seed=42, drop_single=False)
    assert not kept.duplicated(["user", "timestamp"]).any()
    again = _module("movielens").filter_ratings(df, seed=42, drop_single=False)
    assert kept.equals(again)  # the random choice of step (3) is seeded


def test_instacart_counts(data_dir):
    train, val, test = _load("instacart", "load", data_dir)
    _check_split((train, val, test), 24_781 + 1_433)
    assert len(train) + len(val) == 24_781
    assert train.num_observations + val.num_observations == 275_345
    assert (len(test), test.num_observations) == (1_433, 16_066)
    assert len(val) == 24_781 - int(0.75 * 24_781)
    assert test.items is train.items and len(train.items) == 63


@pytest.mark.parametrize("lags", [0, 1, 2])
def test_temperature_counts(data_dir, lags):
    train, val, test = _load("temperature", "load", data_dir, lags=lags, drop_states_with_missing=True)
    _check_split((train, val, test), 31 * 13)  # one unit per October day of 2007-2019
    assert (len(train), len(val), len(test)) == (31 * 6, 31 * 4, 31 * 3)
    years = [{label // 10_000 for label in d.unit_labels} for d in (train, val, test)]
    assert years == [set(range(2007, 2013)), set(range(2013, 2017)), set(range(2017, 2020))]
    for d in (train, val, test):
        assert torch.all(d.target.sum(-1) == 44)  # 44 cities modelled every day
        assert torch.all(d.lengths == 44 * (1 + lags))  # plus 44 context rows per lag day
        assert len(d.keys) == 44 * (1 + lags)
        key_lags = torch.tensor([0 if lags == 0 else label[2] for label in d.keys.labels])
        lag_of_row = key_lags[d.key_index]
        assert not (d.target & (lag_of_row > 0)).any(), "a context row is a target"
        assert torch.equal(d.mask & ~d.target, d.mask & (lag_of_row > 0))
    df = _module("temperature").read_temperatures(data_dir, drop_states_with_missing=True)
    cities = df["city"].nunique()
    assert cities == 44


def test_temperature_lag_rows(data_dir):
    # the lag-1 row of a city on October 1 is that city's September 30 temperature
    df = _module("temperature").read_temperatures(data_dir, drop_states_with_missing=True)
    train, _, _ = _load("temperature", "load", data_dir, lags=1, drop_states_with_missing=True)
    u = train.unit_labels.index(20_071_001)
    lat, lon = float(df["latitude"].iloc[0]), float(df["longitude"].iloc[0])
    row = df[(df["latitude"] == lat) & (df["longitude"] == lon)].set_index("date")["temperature"]
    keys = [train.keys.labels[i] for i in train.key_index[u].tolist()]
    values = dict(zip(keys, train.values[u].tolist(), strict=True))
    assert values[lat, lon, 1] == pytest.approx(row["2007-09-30"])
    assert values[lat, lon, 0] == pytest.approx(row["2007-10-01"])


def test_knn_baseline(data_dir):
    table = _module("temperature").knn_baseline(data_dir, ks=[1, 5, 40], drop_states_with_missing=True)
    assert list(table["k"]) == [1, 5, 40]
    mse = dict(zip(table["k"], table["test_mse"], strict=True))
    assert 0 < mse[5] < mse[40]  # the nearest cities carry the information


def test_ridge_baseline(data_dir):
    temperature = _module("temperature")
    tiny = temperature.ridge_baseline(data_dir, lags=0, penalties=[1e-6], drop_states_with_missing=True)
    # a vanishing penalty is ordinary least squares with an intercept: check one city directly
    df = temperature.read_temperatures(data_dir, drop_states_with_missing=True)
    wide = df.pivot(index="date", columns="city", values="temperature")
    october = wide[wide.index.month == 10]
    train = np.isin(october.index.year, list(temperature.TRAIN_YEARS))
    test = np.isin(october.index.year, list(temperature.TEST_YEARS))
    sq = np.zeros((len(october), october.shape[1]))
    for c in range(october.shape[1]):
        x = np.column_stack([np.ones(len(october)), np.delete(october.to_numpy(), c, axis=1)])
        y = october.to_numpy()[:, c]
        coef = np.linalg.lstsq(x[train], y[train], rcond=None)[0]
        sq[:, c] = (x @ coef - y) ** 2
    assert tiny["test_mse"].iloc[0] == pytest.approx(sq[test].mean(), rel=1e-4)
    # the previous day helps on the validation days at the best penalty
    best = {
        lags: temperature.ridge_baseline(data_dir, lags=lags, drop_states_with_missing=True)["val_mse"].min()
        for lags in (0, 1)
    }
    assert best[1] < best[0]


# ------------------------------------------------------------------------------------------------
# scripts
SMOKE = [
    ("synthetic.py",),
    ("movielens.py", "--task", "movielens_items"),
    ("movielens.py", "--task", "movielens_ratings"),
    ("instacart.py",),
    ("temperature.py", "--lags", "1"),
    ("baselines.py", "--task", "instacart"),
]
NEEDS_DATA = {"movielens.py", "instacart.py", "temperature.py", "baselines.py"}


def test_smoke_list_covers_every_script():
    scripts = {p.name for p in MODELS.glob("*.py") if '__name__ == "__main__"' in p.read_text()}
    assert scripts, "no scripts found in models/"
    missing = scripts - {s[0] for s in SMOKE}
    assert not missing, f"models/ scripts without a smoke test: {sorted(missing)}"


@pytest.mark.parametrize("script", SMOKE, ids=" ".join)
def test_script_smoke(script, request):
    name, *args = script
    if name in NEEDS_DATA:
        args += ["--data-dir", str(request.getfixturevalue("data_dir"))]
    cmd = [sys.executable, str(MODELS / name), "--smoke", "--seeds", "0", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "EFA" in proc.stdout and "EFE" in proc.stdout


# ------------------------------------------------------------------------------------------------
# the one interface
def test_every_experiment_builds_its_models_and_options():
    assert set(models.EXPERIMENTS) == {
        "synthetic", "instacart", "movielens_items", "movielens_ratings",
        "temperature", "temperature_lag1", "temperature_lag2",
    }  # fmt: skip
    for name, exp in models.EXPERIMENTS.items():
        assert models.get(name) is exp
        for direction in exp.directions:
            for which in ("efa", "efe"):
                assert isinstance(exp.config(which, direction), EFAConfig)
                assert isinstance(exp.fit_options(which, direction), FitOptions)
            assert exp.config("efe", direction).attention == "uniform"
    with pytest.raises(ValueError, match="unknown experiment"):
        models.get("mnist")
    with pytest.raises(ValueError, match="direction"):
        models.get("temperature").config("efa", "uni")
