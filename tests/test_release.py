"""The release: ``python -m build`` makes an sdist and a wheel; the wheel holds the package, its
``py.typed`` marker and its licence, and no tests, data or notebooks; installed into a fresh
virtual environment (not editable, not from the checkout) it imports, reports the version of its
metadata, and fits from the command line.

Skips when ``build`` (the ``docs`` extra) is not installed. About a minute, most of it installing
torch (the CPU wheel of ``torch==2.13.0`` from local disk) and pyro-ppl into the new environment.
"""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _project_field(name: str) -> str:
    """A string field of pyproject's [project] table (tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(rf'^{name}\s*=\s*"([^"]*)"', text, re.M).group(1)


VERSION = _project_field("version")
# the torch to install first: a bare "torch" requirement would pull a multi-GB CUDA build
TORCH = os.environ.get("PYRO_EFA_TEST_TORCH", "torch==2.13.0")

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the docs extra is not installed (no 'build'): pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_holds_the_package_and_nothing_else(dist):
    wheel = dist["wheel"]
    assert wheel.name == f"pyro_efa-{VERSION}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    info = f"pyro_efa-{VERSION}.dist-info"
    assert {name.split("/")[0] for name in names} == {"pyro_efa", info}
    expected = {
        f"pyro_efa/{p.relative_to(ROOT / 'pyro_efa').as_posix()}" for p in (ROOT / "pyro_efa").rglob("*.py")
    }
    expected |= {f"pyro_efa/models/{p.name}" for p in (ROOT / "models").glob("*.py")}  # package-dir
    expected |= {"pyro_efa/py.typed", f"{info}/licenses/LICENSE"}
    assert not expected - set(names), f"missing from the wheel: {sorted(expected - set(names))}"
    unwanted = [
        name
        for name in names
        if name.startswith(("tests/", "docs/", "benchmarks/", "tutorials/"))
        or "/tests/" in name
        or name.endswith((".ipynb", ".csv", ".parquet", ".pt", ".jsonl"))
        or (name.endswith(".json") and not name.startswith(info))
    ]
    assert not unwanted, f"the wheel holds tests, data or notebooks: {unwanted}"


def test_metadata(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        text = wheel.read(f"pyro_efa-{VERSION}.dist-info/METADATA").decode()
    meta = email.parser.Parser().parsestr(text)
    assert meta["Name"] == "pyro-efa"
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    assert meta["Requires-Python"] == _project_field("requires-python")
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "Exponential family attention" in meta.get_payload()  # the README
    assert meta.get_all("Project-URL")
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Intended Audience :: Science/Research" in classifiers
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", "pyro_efa/py.typed", "models/__init__.py"} <= names


def test_wheel_installs_and_runs_in_a_fresh_venv(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python, cli = venv / "bin" / "python", venv / "bin" / "pyro-efa"
    _run([str(python), "-m", "pip", "install", "-q", TORCH], cwd=tmp_path)
    _run([str(python), "-m", "pip", "install", "-q", str(dist["wheel"])], cwd=tmp_path)

    # the installed copy, not the checkout; one version everywhere
    probe = (
        "import importlib.metadata, json, pyro_efa, pyro_efa.models, pyro_efa.cli; print(json.dumps("
        "{'file': pyro_efa.__file__, 'models': pyro_efa.models.__file__, 'version': pyro_efa.__version__,"
        " 'metadata': importlib.metadata.version('pyro-efa')}))"
    )
    found = json.loads(_run([str(python), "-c", probe], cwd=tmp_path).stdout)
    site = (venv / "lib").resolve()
    for key in ("file", "models"):
        assert Path(found[key]).resolve().is_relative_to(site), found
        assert not Path(found[key]).resolve().is_relative_to(ROOT), found
    assert (Path(found["file"]).parent / "py.typed").exists()
    assert found["version"] == found["metadata"] == VERSION
    assert _run([str(cli), "--version"], cwd=tmp_path).stdout.strip() == f"pyro-efa {VERSION}"
    _run([str(python), "-c", "import pyro_efa"], cwd=tmp_path)

    # a small fit from the command line, then its held-out metrics
    rng = np.random.default_rng(0)
    rows = [
        (u, int(m), int(rng.integers(0, 4)), t)
        for u in range(30)
        for t, m in enumerate(rng.permutation(5)[:4])
    ]
    pd.DataFrame(rows, columns=["user", "movie", "rating", "time"]).to_csv(tmp_path / "tiny.csv", index=False)
    fit = [str(cli), "fit", "tiny.csv", "--unit", "user", "--key", "movie", "--value", "rating"]
    fit += ["--order", "time", "--family", "poisson", "--epochs", "1", "--no-progress", "--out", "fit"]
    _run(fit, cwd=tmp_path)
    metrics = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert metrics, "metrics.json is empty"
    out = _run([str(cli), "evaluate", "fit", "tiny.csv"], cwd=tmp_path).stdout
    assert "NLL" in out
