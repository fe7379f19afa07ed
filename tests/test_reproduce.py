"""benchmarks/reproduce.py: a smoke run of every experiment, and one real fit (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce.py"
REQUIRED = {"experiment", "direction", "model", "guide", "metric", "mean", "sd", "seeds", "paper"}
EXPERIMENTS = {
    "synthetic", "instacart", "movielens_items", "movielens_ratings",
    "temperature", "temperature_lag1", "temperature_lag2",
}  # fmt: skip


def _reproduce() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyro_efa_reproduce", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=300, capture_output=True)
    rows = json.loads((out / "reproduce.json").read_text())
    assert rows and all(REQUIRED <= set(r) for r in rows)
    assert {r["experiment"] for r in rows} <= EXPERIMENTS
    assert {r["direction"] for r in rows} <= {"uni", "bi"}
    baselines = {"ridge", "knn", "popularity", "markov", "cooccurrence", "movie_mean", "movie_frequency"}
    assert {r["model"] for r in rows} <= {"efa", "efe"} | baselines | {
        r["model"] for r in rows if r["model"].startswith("efa (")
    }
    assert "synthetic" in {r["experiment"] for r in rows}
    for r in rows:
        assert isinstance(r["seeds"], list) and r["seeds"]
        if r["guide"] == "map" and r["metric"] in ("mse", "nll", "nll_no_base"):
            assert r["architecture"]
    text = (out / "reproduce.md").read_text()
    assert "smoke" in text and "| experiment |" in text
    if any(r["experiment"] == "movielens_ratings" for r in rows):  # the real data were there
        assert {r["experiment"] for r in rows} == EXPERIMENTS
        metrics = {(r["guide"], r["metric"]) for r in rows if r["experiment"] == "movielens_ratings"}
        assert {("map", "coverage90"), ("normal", "coverage90"), ("normal", "nll_no_base")} <= metrics
        # every experiment of the paper's data has baselines, each row compared with the best of them
        for name in EXPERIMENTS - {"synthetic"}:
            assert {r["model"] for r in rows if r["experiment"] == name} & baselines, name
        main = [r for r in rows if r["model"] == "efa" and r["guide"] == "map" and "best_other" in r]
        assert main and all(r["ahead"] == (r["mean"] < r["best_other"]["mean"]) for r in main)
        # the row chosen after looking at the test years says so in the table
        assert any(r["test_informed"] for r in rows if r["experiment"] == "temperature_lag1")
        assert "**test** (see notes)" in text


def test_plan_covers_every_row() -> None:
    rp = _reproduce()
    jobs = rp.plan([0, 1, 2], list(rp.EXPERIMENTS), smoke=True, data_dir=Path("."))
    keys = {(j["experiment"], j["model"], j["direction"]) for j in jobs}
    for experiment, spec in rp.EXPERIMENTS.items():
        for direction in spec.directions:
            for model in ("efa", "efe"):
                assert (experiment, model, direction) in keys
    assert all(sum(1 for j in jobs if j == k) == 1 for k in jobs)
    assert {j["seed"] for j in jobs} == {0, 1, 2}
    # the EFE of the temperatures: one key per city (recommended) and coordinate keys
    efe = [j for j in jobs if j["experiment"] == "temperature" and j["model"] == "efe"]
    assert {j["overrides"].get("key_embedding") for j in efe} == {None, "mlp"}
    only_efe = rp.plan([0], list(rp.EXPERIMENTS), smoke=True, data_dir=Path("."), models=("efe",))
    assert only_efe and {j["model"] for j in only_efe} == {"efe"}
    # the slow rows beside the table only with --extended: Instacart with no repeats, the
    # same-day temperature EFA + linear term (the other no-repeat and linear-term rows stay)
    extended = rp.plan([0], list(rp.EXPERIMENTS), smoke=True, data_dir=Path("."), extended=True)
    default = rp.plan([0], list(rp.EXPERIMENTS), smoke=True, data_dir=Path("."))
    extra = [j for j in extended if j not in default]
    assert all(j in extended for j in default)

    def no_repeat(j: dict) -> bool:
        return bool(j.get("overrides", {}).get("exclude_context_items"))

    assert {(j["experiment"], no_repeat(j), j.get("linear_term")) for j in extra} == {
        ("instacart", True, None),
        ("temperature", False, rp.LINEAR_PRIOR),
    }
    assert any(no_repeat(j) and j["experiment"] == "movielens_items" for j in default)
    assert {j["experiment"] for j in default if j.get("linear_term")} == {
        "temperature_lag1",
        "temperature_lag2",
    }


def test_partial_rerun_keeps_the_other_rows(tmp_path: Path) -> None:
    rp = _reproduce()
    runs = [
        {"experiment": "instacart", "model": "efa", "architecture": "2Lx2H d=32", "seed": 0},
        {
            "experiment": "instacart",
            "model": "efe",
            "architecture": "EFE d=32, no repeats (exclude_context_items)",
            "seed": 0,
        },
        {"experiment": "synthetic", "model": "efe", "architecture": "EFE d=32", "seed": 0},
    ]
    (tmp_path / "reproduce_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert rp.kept_runs(tmp_path, ["instacart"], "all") == runs[2:]
    assert rp.kept_runs(tmp_path, ["instacart"], "default") == runs[1:]
    assert rp.kept_runs(tmp_path, ["instacart"], "no_repeat") == [runs[0], runs[2]]
    assert rp.kept_runs(tmp_path / "empty", ["instacart"], "all") == []
    # --models: only the named model groups of the named experiments are redone
    runs = [
        {"experiment": "temperature", "model": "efa", "architecture": "4Lx2H", "seed": 0},
        {"experiment": "temperature", "model": "efe", "architecture": "EFE d=32", "seed": 0},
        {"experiment": "temperature", "model": "ridge", "architecture": "per-city ridge", "seed": 0},
    ]
    (tmp_path / "reproduce_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert rp.kept_runs(tmp_path, ["temperature"], "all", ("efe", "baselines")) == runs[:1]
    assert rp.kept_runs(tmp_path, ["temperature"], "all", ("efa",)) == runs[1:]


@pytest.mark.slow
def test_movielens_items_uni_beats_the_paper(data_dir: Path) -> None:
    """The recommended unidirectional model on MovieLens items, one seed, beats the paper's
    3.4438 (measured 3.3915 for seed 0)."""
    rp = _reproduce()
    job = {"experiment": "movielens_items", "model": "efa", "direction": "uni", "seed": 0}
    result = rp.run_one({**job, "data_dir": str(data_dir)})
    assert result["test"] < 3.4438, result
