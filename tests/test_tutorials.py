"""The tutorial notebooks: each runs end to end at smoke size, and each is committed executed.

Every notebook in ``tutorials/`` is found by a sorted glob, so a new notebook is covered without
editing this file. The notebooks read the real data beside the checkout when it is there and a
generated stand-in otherwise; ``CI=1`` in the kernel's environment shrinks them to seconds.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
SMOKE_CONVENTION = 'smoke_test = "CI" in os.environ'


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_tutorials_exist() -> None:
    assert len(NOTEBOOKS) >= 5, f"expected the five tutorials in {TUTORIALS}, found {_ids(NOTEBOOKS)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_at_smoke_size(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")  # the kernel inherits the environment: smoke sizes
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [
        f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_executed(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    assert SMOKE_CONVENTION in code[0].source, (
        f"{path.name}: the first code cell must set {SMOKE_CONVENTION!r} (smoke sizes under CI)"
    )
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} were not executed (run it and save it)"
    assert any(c.get("outputs") for c in code), f"{path.name} is saved without outputs"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} is saved with an error output: {errors[0].get('evalue')}"
    size = path.stat().st_size
    assert size < 1_500_000, f"{path.name} is {size / 1e6:.1f} MB; keep figures few and small"
