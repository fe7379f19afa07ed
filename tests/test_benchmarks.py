"""Every benchmark script runs with tiny sizes (``--smoke``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# script -> extra smoke arguments
SMOKE = {
    "speed.py": [],
    "reproduce.py": [],
    "big_tables.py": [],
    "efe_temperature.py": [],
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke(script: str, tmp_path) -> None:
    cmd = [sys.executable, str(BENCHMARKS / script), "--smoke", *SMOKE[script]]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=300, capture_output=True)


def test_every_benchmark_is_smoke_tested() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text()}
    assert scripts <= set(SMOKE), f"add {sorted(scripts - set(SMOKE))} to SMOKE"
