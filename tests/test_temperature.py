"""models/temperature.py on tables as users bring them: missing readings (-99), whole days
missing, months other than October, other files, through the loader, the baselines, a tiny fit
and the command line. Generated tables in the Kaggle format are written to ``tmp_path``; the
last tests read the real October file (``../shared/data``) and skip when it is absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_efa
from pyro_efa.models import temperature
from pyro_efa.models.base import SMOKE_MODEL

SCRIPT = Path(__file__).resolve().parents[1] / "models" / "temperature.py"
CITIES = [  # State, City, Latitude, Longitude
    ("Alabama", "Birmingham", 33.543682, -86.779633),
    ("Arkansas", "Fort Smith", 35.385803, -94.403229),
    ("California", "Fresno", 36.746841, -119.772591),
    ("Colorado", "Denver", 39.739236, -104.990251),
    ("Georgia", "Atlanta", 33.748995, -84.387982),
    ("Illinois", "Chicago", 41.878114, -87.629798),
]
KAGGLE = ["Region", "Country", "State", "City", "Month", "Day", "Year", "AvgTemperature"]
YEARS = range(2007, 2020)
DAYS = 6  # days of the month in a generated table: 78 units, 36 of them training days


def write_table(
    folder: Path,
    month: int = 10,
    before: int = 2,
    missing: set[tuple[int, pd.Timestamp]] = frozenset(),
    absent: set[pd.Timestamp] = frozenset(),
) -> tuple[Path, Path]:
    """A Kaggle-format table of CITIES on the first DAYS days of ``month`` and the ``before``
    days before it, 2007-2019 (a shared daily shock plus noise, colder to the north), and the
    coordinates table. ``missing``: (city index, date) pairs that read -99; ``absent``: dates
    without rows."""
    rng = np.random.default_rng(0)
    rows = []
    for year in YEARS:
        first = pd.Timestamp(year=year, month=month, day=1)
        for date in pd.date_range(first - pd.Timedelta(days=before), periods=before + DAYS):
            shock = rng.normal(0.0, 8.0)
            for i, (state, city, lat, _) in enumerate(CITIES):
                value = round(75.0 - 0.8 * (lat - 33.0) + shock + rng.normal(0.0, 2.0), 1)
                if (i, date) in missing:
                    value = temperature.MISSING
                if date not in absent:
                    rows.append(("North America", "US", state, city, date.month, date.day, date.year, value))
    data, coords = folder / "temperatures.csv", folder / "coordinates.csv"
    pd.DataFrame(rows, columns=KAGGLE).to_csv(data, index=False)
    pd.DataFrame(CITIES, columns=["State", "City", "Latitude", "Longitude"]).to_csv(coords, index=False)
    return data, coords


def fit_and_score(lags: int, splits: temperature.Splits) -> list[dict]:
    """A tiny fit (the --smoke sizes, 2 epochs) of the recommended EFA; metrics on every split."""
    experiment = temperature.EXPERIMENTS[lags]
    model = experiment.model("efa", "bi", splits, **SMOKE_MODEL, ff_dim=8)
    options = experiment.fit_options("efa", "bi", num_epochs=2, seed=0)
    fitted = pyro_efa.fit(model, splits[0], val_data=splits[1], options=options, progress=False)
    metrics = [pyro_efa.evaluate(fitted, d) for d in splits]
    for m in metrics:
        assert np.isfinite(m["mse"]) and np.isfinite(m["nll"])
    return metrics


def assert_finite(table: pd.DataFrame) -> None:
    assert np.isfinite(table[["val_mse", "test_mse"]].to_numpy()).all()
    assert (table[["val_mse", "test_mse"]].to_numpy() > 0).all()


def units(data: pyro_efa.EFAData, label: int) -> tuple[int, int]:
    """(rows, targets) of the unit ``label``."""
    u = data.unit_labels.index(label)
    return int(data.mask[u].sum()), int((data.target & data.mask)[u].sum())


# ------------------------------------------------------------------------------------------------
def test_every_city_misses_one_day(tmp_path):
    # before: every state had a -99, so every city was dropped ("the table is empty")
    missing = {(i, pd.Timestamp(2007 + 2 * i, 10, 1 + i)) for i in range(len(CITIES))}  # 6 splits' years
    data, coords = write_table(tmp_path, missing=missing)
    options = {"path": data, "coordinates": coords}
    with pytest.raises(ValueError, match="keeps no city"):
        temperature.load(**options, drop_states_with_missing=True)
    splits = temperature.load(**options)
    assert [len(d) for d in splits] == [6 * DAYS, 4 * DAYS, 3 * DAYS]
    expected = {(lat, lon): 1 for _, _, lat, lon in CITIES}  # one reading left out per city
    for d in splits:
        assert len(d.keys) == len(CITIES) and d.missing == expected
    assert sum(d.num_observations for d in splits) == len(CITIES) * 13 * DAYS - len(CITIES)
    assert units(splits[0], 20071001) == (5, 5) and units(splits[0], 20071002) == (6, 6)
    assert units(splits[2], 20171006) == (5, 5)
    knn = temperature.knn_baseline(ks=[1, 2, 5], **options)
    assert_finite(knn)
    assert knn.attrs["left_out"] == []
    for lags in (0, 1):
        assert_finite(temperature.ridge_baseline(lags=lags, **options))
    fit_and_score(0, splits)


@pytest.mark.parametrize("lags", [0, 1, 2])
def test_a_whole_day_missing(tmp_path, lags):
    days = [pd.Timestamp(2008, 10, 3), pd.Timestamp(2018, 10, 3)]  # a training day and a test day
    data, coords = write_table(tmp_path, missing={(i, d) for i in range(len(CITIES)) for d in days})
    options = {"path": data, "coordinates": coords}
    splits = train, _, test = temperature.load(lags=lags, **options)
    if lags == 0:  # the day is no unit
        assert 20081003 not in train.unit_labels and 20181003 not in test.unit_labels
        assert train.missing["<units>"] == [20081003, 20181003]
        assert (len(train), len(test)) == (6 * DAYS - 1, 3 * DAYS - 1)
    else:  # a unit of lag rows only; the next day has no lag-1 rows
        assert units(train, 20081003) == (len(CITIES) * lags, 0)
        assert units(test, 20181003) == (len(CITIES) * lags, 0)
        assert units(train, 20081004) == (len(CITIES) * lags, len(CITIES))
        assert units(train, 20081005) == (2 * len(CITIES), len(CITIES))  # no lag-2 rows (Oct 3)
    fit_and_score(lags, splits)
    assert_finite(temperature.knn_baseline(ks=[1, 3], **options))
    assert_finite(temperature.ridge_baseline(lags=lags, **options))


@pytest.mark.parametrize("month", [1, 3])
def test_other_month(tmp_path, month):
    # one day read before the month: the first day has lag-1 rows (Dec 31 / Feb 28 or 29), no lag-2
    data, coords = write_table(tmp_path, month=month, before=1)
    options = {"path": data, "coordinates": coords, "month": month}
    splits = train, val, test = temperature.load(lags=2, **options)
    assert all(label // 100 % 100 == month for d in splits for label in d.unit_labels)
    assert [len(d) for d in splits] == [6 * DAYS, 4 * DAYS, 3 * DAYS]
    n = len(CITIES)
    first, second = 2008_00_01 + month * 100, 2008_00_02 + month * 100  # 2008: a leap year
    assert units(train, first) == (2 * n, n) and units(train, second) == (3 * n, n)
    # the lag-1 row of Birmingham on the first day is its reading of the day before
    table = pd.read_csv(data)
    previous = pd.Timestamp(2008, month, 1) - pd.Timedelta(days=1)
    read = table[(table["City"] == "Birmingham") & (table["Year"] == previous.year)]
    expected = read[(read["Month"] == previous.month) & (read["Day"] == previous.day)]["AvgTemperature"]
    u = train.unit_labels.index(first)
    observed = train.mask[u]
    keys, values = train.key_index[u][observed].tolist(), train.values[u][observed].tolist()
    rows = {train.keys.labels[k]: v for k, v in zip(keys, values, strict=True)}
    assert rows[CITIES[0][2], CITIES[0][3], 1] == pytest.approx(float(expected.iloc[0]))
    assert_finite(temperature.knn_baseline(ks=[1, 2], **options))
    assert_finite(temperature.ridge_baseline(lags=2, **options))
    with pytest.raises(ValueError, match="no day of month 10"):
        temperature.load(path=data, coordinates=coords)


def test_city_without_coordinates_is_named(tmp_path):
    data, coords = write_table(tmp_path)
    pd.read_csv(coords).drop(index=3).to_csv(coords, index=False)  # Denver
    with pytest.raises(ValueError, match="'Denver, Colorado' has no coordinates"):
        temperature.read_temperatures(path=data, coordinates=coords)


def test_city_without_training_readings_is_left_out(tmp_path):
    train_days = [pd.Timestamp(y, 10, d) for y in temperature.TRAIN_YEARS for d in range(1, DAYS + 1)]
    data, coords = write_table(tmp_path, missing={(0, d) for d in train_days})
    options = {"path": data, "coordinates": coords}
    for baseline in (temperature.knn_baseline, temperature.ridge_baseline):
        with pytest.warns(UserWarning, match="left out of the targets: Birmingham, Alabama"):
            table = baseline(**options)
        assert_finite(table)
        assert table.attrs["left_out"] == ["Birmingham, Alabama"]


def test_cli_other_file_and_month(tmp_path):
    data, coords = write_table(tmp_path, month=3, missing={(1, pd.Timestamp(2009, 3, 2))})
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--seeds", "0", "--lags", "1", "--data", str(data),
           "--coordinates", str(coords), "--month", "3", "--data-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "EFA" in proc.stdout and "EFE" in proc.stdout and "k-nearest" in proc.stdout
    assert "(no intercept)" not in proc.stdout  # the paper's numbers are for October only
    assert "MSE nan" not in proc.stdout


# ------------------------------------------------------------------------------------------------
# the real October file
def test_october_paper_protocol_is_what_the_experiments_read(data_dir):
    october = data_dir / "temperature" / "city_temperature_us_october.csv"
    for lags in (0, 1):
        default = temperature.load(data_dir, lags=lags, **temperature.PAPER_RUN)  # what reproduce.py reads
        explicit = temperature.EXPERIMENTS[lags].load(data_dir)
        chosen = temperature.load(data_dir, lags=lags, path=october, drop_states_with_missing=True)
        for a, b, c in zip(default, explicit, chosen, strict=True):
            for field in ("key_index", "values", "mask", "target"):
                assert torch.equal(getattr(a, field), getattr(b, field))
                assert torch.equal(getattr(a, field), getattr(c, field))
            assert a.unit_labels == b.unit_labels == c.unit_labels
            assert a.keys.labels == b.keys.labels == c.keys.labels and not a.missing


def test_october_missing_readings_left_out(data_dir):
    october = data_dir / "temperature" / "city_temperature_us_october.csv"
    train, val, test = temperature.load(data_dir)  # the default: missing readings left out
    assert len(train.keys) == 47
    assert sum(train.missing.values()) == 11  # Phoenix 5, Bridgeport 4, Rapid City 2
    assert sum(d.num_observations for d in (train, val, test)) == 47 * 403 - 11
    knn = temperature.knn_baseline(data_dir, ks=[5], path=october)
    assert_finite(knn)
    assert_finite(temperature.ridge_baseline(data_dir, lags=1, path=october))
