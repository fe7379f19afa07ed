"""The ``pyro-efa`` command line: demo, fit / evaluate round trip, predict, and user errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import error_line, metric_block

from pyro_efa.cli import main

SMALL = ["--epochs", "2", "--dim", "8", "--no-progress"]


def _counts_csv(path: Path, num_users: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        for t, movie in enumerate(rng.permutation(["a", "b", "c", "d", "e"])[: rng.integers(3, 6)]):
            rows.append(
                {"user_id": 100 + u, "movie_id": movie, "timestamp": 10 * t, "count": rng.poisson(2.0)}
            )
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _items_csv(path: Path, num_baskets: int = 40, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(num_baskets):
        for rank, item in enumerate(rng.choice(6, size=rng.integers(2, 6), replace=False)):
            rows.append({"order_id": f"o{b}", "product_id": int(item) + 1, "rank": rank + 1})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def counts_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("counts")
    csv = _counts_csv(root / "counts.csv")
    out = root / "fit"
    args = ["fit", str(csv), "--unit", "user_id", "--key", "movie_id", "--value", "count"]
    args += ["--order", "timestamp", "--family", "poisson", "--direction", "bi", "--out", str(out)]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(args + SMALL) == 0
    return csv, out, buf.getvalue()


def test_module_help_subprocess() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pyro_efa", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    for command in ("demo", "fit", "evaluate", "predict"):
        assert command in res.stdout


def test_demo_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--num-users", "200", "--num-epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["EFA"], ["EFE"])]
    assert [r[:2] for r in rows] == [["EFA", "uni"], ["EFA", "bi"], ["EFE", "uni"], ["EFE", "bi"]]
    assert all(np.isfinite(float(r[2])) and float(r[2]) > 0 for r in rows)
    assert "Bayes-optimal test MSE: 1.0" in out
    assert "test 50" in out  # users 151-200


def test_fit_evaluate_round_trip_counts(counts_fit: tuple[Path, Path, str], capsys) -> None:
    csv, out, fit_text = counts_fit
    assert {"config.json", "params.pt", "split.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert metrics["units"] == {"train": 32, "validation": 4, "test": 4}
    assert len(split["test"]) == 4 and all(isinstance(u, int) for u in split["test"])

    assert main(["evaluate", str(out), str(csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["test"]  # exact floats
    assert main(["evaluate", str(out), str(csv)]) == 0
    text = capsys.readouterr().out
    assert metric_block(text) == metric_block(fit_text)
    assert any("MSE" in line for line in metric_block(text))

    assert main(["evaluate", str(out), str(csv), "--units", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_observations"] > metrics["test"]["num_observations"]


def test_fit_evaluate_round_trip_items(tmp_path: Path, capsys) -> None:
    csv = _items_csv(tmp_path / "baskets.csv")
    out = tmp_path / "fit"
    args = ["fit", str(csv), "--unit", "order_id", "--key", "product_id", "--order", "rank"]
    assert main(args + ["--family", "categorical", "--efe", "--out", str(out), *SMALL]) == 0
    fit_text = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert "accuracy" in metrics["test"]
    assert main(["evaluate", str(out), str(csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["test"]
    assert main(["evaluate", str(out), str(csv)]) == 0
    assert metric_block(capsys.readouterr().out) == metric_block(fit_text)
    # refitting into a directory that holds a previous fit is allowed
    assert main(args + ["--out", str(out), *SMALL]) == 0
    assert "replaced the fit" in capsys.readouterr().out


def test_predict(counts_fit: tuple[Path, Path, str], tmp_path: Path, capsys) -> None:
    csv, out, _ = counts_fit
    metrics = json.loads((out / "metrics.json").read_text())
    dest = tmp_path / "predictions.csv"
    assert main(["predict", str(out), str(csv), "--out", str(dest)]) == 0
    table = pd.read_csv(dest)
    assert len(table) == metrics["test"]["num_observations"]
    assert {"unit", "key", "value", "prediction", "log_likelihood"} <= set(table.columns)
    split = json.loads((out / "split.json").read_text())
    assert set(table["unit"]) == set(split["test"])
    assert np.isclose(-table["log_likelihood"].mean(), metrics["test"]["nll"])
    capsys.readouterr()
    assert main(["predict", str(out), str(csv), "--head", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "prediction" in printed[0] and len(printed) == 5  # header, 3 rows, the count line
    # an existing predictions file is not overwritten without --force
    assert main(["predict", str(out), str(csv), "--out", str(dest)]) == 2
    assert "--force" in error_line(capsys)


def test_family_map(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=20)
    out = tmp_path / "fit"
    args = ["fit", str(csv), "--unit", "user_id", "--key", "movie_id", "--value", "count", "--ties", "keep"]
    family_map = ["--family-map", "a=negative_binomial,b=poisson", "--family", "poisson"]
    assert main(args + family_map + ["--out", str(out), *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["family"] == ["negative_binomial", "poisson", "poisson", "poisson", "poisson"]
    capsys.readouterr()
    # without a default family every key needs an entry
    assert main(args + ["--family-map", "a=poisson", "--out", str(tmp_path / "f2"), *SMALL]) == 2
    assert "no family" in error_line(capsys)
    assert (
        main(args + ["--family-map", "zz=poisson", "--family", "poisson", "--out", str(tmp_path / "f3")]) == 2
    )
    assert "'zz'" in error_line(capsys)


# -- user errors: one line on stderr, exit code 2 -----------------------------------------------
def _fit_args(csv: Path, out: Path, *extra: str) -> list[str]:
    base = ["fit", str(csv), "--unit", "user_id", "--key", "movie_id", "--value", "count"]
    return [*base, "--family", "poisson", "--out", str(out), *extra, *SMALL]


def test_error_missing_file(tmp_path: Path, capsys) -> None:
    assert main(_fit_args(tmp_path / "nope.csv", tmp_path / "fit")) == 2
    assert "nope.csv" in error_line(capsys)


def test_error_missing_column(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=10)
    args = _fit_args(csv, tmp_path / "fit")
    args[args.index("count")] = "clicks"
    assert main(args) == 2
    assert "clicks" in error_line(capsys)


def test_error_nan_values(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=10)
    df = pd.read_csv(csv)
    df.loc[3, "count"] = np.nan
    df.to_csv(csv, index=False)
    assert main(_fit_args(csv, tmp_path / "fit")) == 2
    line = error_line(capsys)
    assert "'count'" in line and "NaN" in line


def test_error_bad_family(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=10)
    args = _fit_args(csv, tmp_path / "fit")
    args[args.index("poisson")] = "poison"
    assert main(args) == 2
    line = error_line(capsys)
    assert "'poison'" in line and "poisson" in line
    assert not (tmp_path / "fit").exists()


def test_error_items_with_scalar_family(tmp_path: Path, capsys) -> None:
    csv = _items_csv(tmp_path / "baskets.csv", num_baskets=10)
    args = ["fit", str(csv), "--unit", "order_id", "--key", "product_id", "--family", "poisson"]
    assert main([*args, "--out", str(tmp_path / "fit"), *SMALL]) == 2
    assert "--value" in error_line(capsys)


def test_error_unknown_keys(counts_fit: tuple[Path, Path, str], tmp_path: Path, capsys) -> None:
    csv, out, _ = counts_fit
    df = pd.read_csv(csv)
    df.loc[df.index[-1], "movie_id"] = "zzz"
    new = tmp_path / "new.csv"
    df.to_csv(new, index=False)
    assert main(["evaluate", str(out), str(new), "--units", "all"]) == 2
    line = error_line(capsys)
    assert "movie_id" in line and "zzz" in line


def test_error_not_a_fit(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=10)
    (tmp_path / "empty").mkdir()
    for command in ("evaluate", "predict"):
        assert main([command, str(tmp_path / "empty"), str(csv)]) == 2
        assert "fit" in error_line(capsys)


def test_error_out_dir_not_a_fit(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=20)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(_fit_args(csv, out)) == 2
    line = error_line(capsys)
    assert "mine" in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(_fit_args(csv, out, "--force")) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.json").is_file()


def test_fit_with_lr_decay(tmp_path: Path) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=30)
    out = tmp_path / "fit"
    assert main(_fit_args(csv, out, "--lr-decay", "0.5", "--lr-patience", "0")) == 0
    assert "lr_decay" in (out / "config.json").read_text()


@pytest.mark.parametrize(
    ("flag", "value"), [("--lr-decay", "1.5"), ("--lr-decay", "0"), ("--lr-patience", "-1")]
)
def test_error_bad_lr_schedule(tmp_path: Path, capsys, flag: str, value: str) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=10)
    assert main(_fit_args(csv, tmp_path / "fit", flag, value)) == 2
    assert flag in error_line(capsys)
    assert not (tmp_path / "fit").exists()


def test_error_lr_decay_without_validation(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=10)
    assert main(_fit_args(csv, tmp_path / "fit", "--lr-decay", "0.5", "--split", "0.8", "0", "0.2")) == 2
    assert "--lr-decay" in error_line(capsys)


def test_error_usage(capsys) -> None:
    assert main(["fit", "data.csv", "--key", "k", "--out", "x"]) == 2
    assert "--unit" in error_line(capsys)
    assert main([]) == 2
    error_line(capsys)
    assert main(["--help"]) == 0


def test_parquet_multi_column_keys_and_context(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    cities = [(40.7, -74.0), (34.0, -118.2), (41.9, -87.6)]
    rows = [
        {"day": d, "lat": lat, "lon": lon, "temp": rng.normal(60, 5), "lag": i == 0}
        for d in range(30)
        for i, (lat, lon) in enumerate(cities)
    ]
    path = tmp_path / "temps.parquet"
    pd.DataFrame(rows).to_parquet(path)
    out = tmp_path / "fit"
    args = ["fit", str(path), "--unit", "day", "--key", "lat", "--key", "lon", "--value", "temp"]
    args += [
        "--context",
        "lag",
        "--family-map",
        "40.7:-74=gaussian",
        "--family",
        "gamma",
        "--direction",
        "bi",
    ]
    assert main([*args, "--out", str(out), *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["key_embedding"] == "mlp"
    assert sorted(config["model"]["family"]) == ["gamma", "gamma", "gaussian"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["num_observations"] == 2 * metrics["units"]["test"]  # lag rows are context
    capsys.readouterr()
    assert main(["evaluate", str(out), str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["test"]
    # an option the family does not take
    bad = [*args, "--family-option", "gamma.foo=1", "--out", str(tmp_path / "f2"), *SMALL]
    assert main(bad) == 2
    assert "--family-option" in error_line(capsys)


# -- data as users bring it: string classes, missing values, checks of the whole table ----------
def _mixed_csv(path: Path, num_cars: int = 60, seed: int = 0) -> Path:
    """A long table of cars: numbers and strings in one value column, -99 and empty cells for
    missing readings."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(num_cars):
        origin = rng.choice(["usa", "europe", "japan"])
        cyl = int(rng.poisson(5 if origin == "usa" else 4))
        values = {"cyl": cyl, "mpg": round(40 - 3 * cyl + rng.normal(0, 2), 1), "origin": origin}
        for key, value in values.items():
            rows.append({"car": f"car{c:02d}", "variable": key, "value": value})
    df = pd.DataFrame(rows).astype({"value": object})
    df.loc[[1, 7], "value"] = -99  # two sentinel readings
    df.loc[[4], "value"] = np.nan  # an empty cell
    df.to_csv(path, index=False)
    return path


MIXED = ["--unit", "car", "--key", "variable", "--value", "value"]
MIXED += ["--family-map", "cyl=poisson,mpg=gaussian,origin=categorical", "--direction", "bi"]


def test_mixed_types_with_string_classes_and_missing_values(tmp_path: Path, capsys) -> None:
    csv = _mixed_csv(tmp_path / "cars.csv")
    out = tmp_path / "fit"
    args = ["fit", str(csv), *MIXED, "--missing", "drop", "--na-values", "-99", "--context-stream", "fixed"]
    assert main([*args, "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "left out 3 missing value(s)" in text
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["context_stream"] == "fixed"
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    per_key = {r["key"]: r for r in metrics["per_key"]}
    assert set(per_key) == {"cyl", "mpg", "origin"}
    assert {"accuracy", "recall@10", "ndcg@10"} <= set(per_key["origin"]) and "mse" not in per_key["origin"]
    assert "mse" in per_key["mpg"] and {r["family"] for r in metrics["per_site"]} == {
        "poisson", "gaussian", "categorical",
    }  # fmt: skip
    block = metric_block(text)
    assert any(line.split()[:1] == ["origin"] for line in block)  # the per-key table is printed
    # evaluate and predict read the file as the fit did (split.json keeps --missing / --na-values)
    assert main(["evaluate", str(out), str(csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    dest = tmp_path / "predictions.csv"
    assert main(["predict", str(out), str(csv), "--out", str(dest)]) == 0
    table = pd.read_csv(dest)
    origin = table[table["key"] == "origin"]
    assert set(origin["prediction"]) <= {"usa", "europe", "japan"}  # labels, not class codes
    assert set(origin["value"]) <= {"usa", "europe", "japan"}


def test_errors_name_the_cli_flags(tmp_path: Path, capsys) -> None:
    csv = _mixed_csv(tmp_path / "cars.csv", num_cars=20)
    assert main(["fit", str(csv), *MIXED, "--out", str(tmp_path / "f1"), *SMALL]) == 2
    line = error_line(capsys)
    assert "--missing drop" in line and "missing='drop'" not in line and "--na-values" in line
    counts = _counts_csv(tmp_path / "counts.csv", num_users=10)
    df = pd.read_csv(counts)
    df.loc[1, "timestamp"] = df.loc[0, "timestamp"]  # a tie within the first user
    df.to_csv(counts, index=False)
    assert main(_fit_args(counts, tmp_path / "f2", "--order", "timestamp")) == 2
    line = error_line(capsys)
    assert "--ties keep" in line and "ties='keep'" not in line
    assert main(_fit_args(counts, tmp_path / "f3", "--split", "0.5", "0.5", "0.5")) == 2
    assert "--split" in error_line(capsys)
    assert main(_fit_args(counts, tmp_path / "f4", "--na-values", "-1")) == 2
    assert "--missing drop" in error_line(capsys)
    assert not any((tmp_path / f).exists() for f in ("f1", "f2", "f3", "f4"))


def _test_units(csv: Path, unit: str, seed: int = 0) -> list:
    from pyro_efa import EFAData

    df = pd.read_csv(csv)
    data = EFAData.from_pandas(
        df, unit=unit, key=df.columns[1], value=df.columns[-1], ties="keep", missing="drop", na_values=[-99]
    )
    return data.split((0.8, 0.1, 0.1), seed=seed)[2].unit_labels


def test_held_out_values_are_checked_before_training(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=40)
    df = pd.read_csv(csv)[["user_id", "movie_id", "count"]]
    df.to_csv(csv, index=False)
    test_units = _test_units(csv, "user_id")
    rows = df.index[df["user_id"].isin(test_units[:2])][:2]
    df.loc[rows, "count"] = -3  # invalid for the Poisson, in test units only
    df.to_csv(csv, index=False)
    out = tmp_path / "fit"
    args = ["fit", str(csv), "--unit", "user_id", "--key", "movie_id", "--value", "count", "--ties", "keep"]
    assert main([*args, "--family", "poisson", "--out", str(out), *SMALL]) == 2
    line = error_line(capsys)
    assert f"unit {int(df.loc[rows[0], 'user_id'])}" in line and "-3" in line and "2 such" in line
    assert "poisson" in line
    assert not (out / "config.json").exists()


def test_classes_only_in_held_out_units_are_named_before_training(tmp_path: Path, capsys) -> None:
    csv = _mixed_csv(tmp_path / "cars.csv", num_cars=40)
    df = pd.read_csv(csv)
    test_units = _test_units(csv, "car")  # the split does not depend on the values
    df.loc[df["car"].isin(test_units[:1]) & (df["variable"] == "origin"), "value"] = "mars"
    df.to_csv(csv, index=False)
    args = ["fit", str(csv), *MIXED, "--missing", "drop", "--na-values", "-99"]
    assert main([*args, "--out", str(tmp_path / "fit"), *SMALL]) == 0
    err = capsys.readouterr().err
    assert "occur only in test units" in err and "class 'mars' of key 'origin'" in err
    assert f"first in unit '{test_units[0]}'" in err


def test_values_in_messages_at_the_data_precision(tmp_path: Path, capsys) -> None:
    csv = _counts_csv(tmp_path / "counts.csv", num_users=10)
    df = pd.read_csv(csv).astype({"count": float})
    df.loc[5, "count"] = 10.9  # not a count; float32 stores 10.899999618530273
    df.to_csv(csv, index=False)
    assert main(_fit_args(csv, tmp_path / "fit", "--ties", "keep")) == 2
    line = error_line(capsys)
    assert "value 10.9 " in line and "10.8999" not in line and "1 such" in line
