"""``pyro-efa fit`` at scale: torchrun data parallelism, checkpoints with --resume after SIGKILL,
--stream from CSV / Parquet shards, --dtype, --no-standardize and --device."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import error_line, metric_block

from pyro_efa.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pyro_efa.cli import main
from pyro_efa.streaming import unit_hash

TINY = ["--dim", "8", "--layers", "1", "--heads", "1", "--no-progress"]
COLUMNS = ["--unit", "user", "--key", "item", "--value", "x", "--order", "t"]
# 2 processes vs 1 (float64): only the order of floating-point sums differs (DDP's all-reduce,
# the split of each batch). Measured: max |difference| of any parameter 2.2e-16 after 18 steps.
ATOL = 1e-10


def _table(path: Path, num_units: int, seed: int = 0) -> Path:
    """A long table, the rows of a unit scattered through the file (CSV, or Parquet by suffix)."""
    rng = np.random.default_rng(seed)
    rows = [
        (u, f"k{k}", t, float(rng.normal(k, 1.0)))
        for u in range(num_units)
        for t, k in enumerate(rng.choice(6, size=int(rng.integers(2, 6)), replace=False))
    ]
    df = pd.DataFrame(rows, columns=["user", "item", "t", "x"]).sample(frac=1.0, random_state=seed)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _main(args: list[str]) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(args) == 0
    return buf.getvalue()


def _params(fit_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(fit_dir / "params.pt", weights_only=True)
    return {f"{part}.{k}": v for part in ("model", "guide") for k, v in state[part].items()}


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m pyro_efa fit ... --batch-size 8`` writes one fit equal (up to
    ATOL in float64) to a one-process fit with --batch-size 16 and the same seed; only rank 0
    prints. No validation part (--split 0.8 0 0.2): every epoch runs, the last state is kept."""
    csv = _table(tmp_path / "small.csv", 120)
    args = ["fit", str(csv), *COLUMNS, *TINY, "--epochs", "3", "--lr", "0.01", "--dtype", "float64"]
    args += ["--split", "0.8", "0", "0.2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*launcher, "-m", "pyro_efa", *args, "--batch-size", "8", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    one_text = _main([*args, "--batch-size", "16", "--out", str(tmp_path / "one")])

    # rank 0 alone printed and warned
    assert two.stdout.count("test metrics (") == 1 and two.stdout.count("data: ") == 1
    assert "2 processes x --batch-size 8 = global batch 16" in two.stdout
    assert two.stderr.count("no validation units") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "config.json", "metrics.json", "params.pt", "split.json"
    ]  # fmt: skip
    one, two_p = _params(tmp_path / "one"), _params(tmp_path / "two")
    assert one.keys() == two_p.keys()
    worst = max(float((v - two_p[k]).abs().max()) for k, v in one.items() if v.is_floating_point())
    assert worst < ATOL, worst
    assert all(v.dtype == torch.float64 for v in one.values() if v.is_floating_point())
    h1, h2 = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("one", "two"))
    assert len(h1["history"]["losses"]) == 3 and h1["history"]["losses"][0] != h1["history"]["losses"][-1]
    np.testing.assert_allclose(h2["history"]["losses"], h1["history"]["losses"], rtol=1e-12)
    assert h1["model"]["standardize"] is True  # the default
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (m2["processes"], m2["batch_size"], m2["global_batch_size"]) == (2, 8, 16)
    assert (m1["processes"], m1["global_batch_size"]) == (1, 16)
    assert m2["test"]["nll"] == pytest.approx(m1["test"]["nll"], rel=1e-10)
    for name in ("split.json",):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert metric_block(two.stdout) == metric_block(one_text)


def test_sigkill_and_resume_through_the_cli_is_bit_identical(tmp_path: Path, capsys) -> None:
    """A ``pyro-efa fit --checkpoint-every 2`` subprocess is killed (SIGKILL) after its first
    checkpoint; ``--resume`` into the same --out (which then holds only the checkpoint) ends with
    the same parameters, history and metrics, bit for bit, as an uninterrupted fit."""
    csv = _table(tmp_path / "units.csv", 240)
    args = ["fit", str(csv), *COLUMNS, *TINY, "--epochs", "2", "--batch-size", "4", "--lr", "0.01"]
    args += ["--guide", "normal", "--checkpoint-every", "2"]  # a sampling guide: RNG states matter

    # uninterrupted; --resume without a checkpoint starts a new fit and says so
    full = tmp_path / "full"
    _main([*args, "--resume", "--out", str(full)])
    assert "no checkpoint at" in capsys.readouterr().err

    out = tmp_path / "resumed"
    ckpt = out / "checkpoint" / CHECKPOINT_NAME
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_efa", *args, "--out", str(out)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = load_checkpoint(ckpt)["step"]
    steps = len(json.loads((full / "config.json").read_text())["history"]["losses"]) * 48  # 192 units / 4
    assert 2 <= killed_at < steps
    assert [p.name for p in out.iterdir()] == ["checkpoint"]  # no fit yet

    text = _main([*args, "--resume", "--out", str(out)])
    assert f"resuming from '{ckpt}'" in text
    a, b = _params(full), _params(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (full, out))
    assert ca["history"]["losses"] == cb["history"]["losses"]
    assert ca["history"]["val_nll"] == cb["history"]["val_nll"]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, out))
    assert ma["test"] == mb["test"]

    # resuming with another learning rate is refused, in one line
    capsys.readouterr()
    assert main([*args, "--resume", "--lr", "0.02", "--out", str(out)]) == 2
    assert "cannot resume" in error_line(capsys)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_stream_fit_and_evaluate(tmp_path: Path, suffix: str, capsys) -> None:
    """``--stream`` trains from several shards; split.json records the hash rule (not the training
    units) and the test units, and ``evaluate`` reproduces the printed metrics exactly."""
    path = _table(tmp_path / f"table{suffix}", 150)
    out = tmp_path / "fit"
    args = ["fit", str(path), *COLUMNS, *TINY, "--epochs", "2", "--batch-size", "16", "--stream"]
    text = _main([*args, "--shard-rows", "100", "--chunk-rows", "64", "--out", str(out)])
    shards = int(re.search(r"shards=(\d+)", text).group(1))
    assert shards > 1, text
    assert "split by unit hash (seed 0)" in text

    split = json.loads((out / "split.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert split["train"] == {"units": metrics["units"]["train"], "listed": False}
    assert split["assignment"]["method"] == "hash" and split["assignment"]["bounds"] == [0.8, 0.9, 1.0]
    assert len(split["test"]) == metrics["units"]["test"] > 0 and metrics["stream"] is True
    assert sum(metrics["units"].values()) == 150
    # the recorded rule gives the recorded parts
    df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    users = df["user"].drop_duplicates()
    part = np.searchsorted(split["assignment"]["bounds"], unit_hash(users, split["seed"]), side="right")
    assert sorted(users[part == 2].tolist()) == sorted(split["test"])
    assert sorted(users[part == 1].tolist()) == sorted(split["validation"])

    capsys.readouterr()
    assert main(["evaluate", str(out), str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["test"]
    assert main(["evaluate", str(out), str(path)]) == 0
    assert metric_block(capsys.readouterr().out) == metric_block(text)


def test_dtype_no_standardize_and_device_reach_the_model(tmp_path: Path, capsys) -> None:
    csv = _table(tmp_path / "small.csv", 60)
    out = tmp_path / "fit"
    args = ["fit", str(csv), *COLUMNS, *TINY, "--epochs", "1", "--out", str(out)]
    text = _main([*args, "--dtype", "float64", "--no-standardize", "--device", "cpu"])
    assert torch.get_default_dtype() == torch.float32  # restored
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["standardize"] is False
    params = _params(out)
    assert {v.dtype for v in params.values() if v.is_floating_point()} == {torch.float64}
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["dtype"], metrics["device"]) == ("float64", "cpu")
    # evaluate rebuilds data and model in float64: the same numbers
    capsys.readouterr()
    assert main(["evaluate", str(out), str(csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["test"]
    assert torch.get_default_dtype() == torch.float32
    assert metric_block(text)


def test_scale_option_errors(tmp_path: Path, capsys) -> None:
    csv = _table(tmp_path / "small.csv", 20)
    base = ["fit", str(csv), *COLUMNS, *TINY]
    out = str(tmp_path / "fit")
    for extra, needle in [
        (["--device", "tpu"], "--device"),
        (["--shard-rows", "10"], "--stream"),
        (["--stream", "--chunk-rows", "0"], "--chunk-rows"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
        (["--dtype", "float16"], "--dtype"),
    ]:
        assert main([*base, *extra, "--out", out]) == 2, extra
        assert needle in error_line(capsys)
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda", "--out", out]) == 2
        assert "CUDA is not available" in error_line(capsys)
    assert not Path(out).exists()
    # an --out holding only a checkpoint directory is accepted; with anything else it is not
    mine = tmp_path / "mine"
    (mine / "checkpoint").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    assert main([*base, "--epochs", "1", "--out", str(mine)]) == 2
    assert "--force" in error_line(capsys)
    (mine / "notes.txt").unlink()
    assert main([*base, "--epochs", "1", "--out", str(mine)]) == 0
    assert (mine / "config.json").is_file()
    # a file where the checkpoint directory should be
    other = tmp_path / "other"
    other.mkdir()
    (other / "ckpt").write_text("")
    assert main([*base, "--checkpoint-dir", str(other / "ckpt"), "--out", str(tmp_path / "f2")]) == 2
    assert "--checkpoint-dir" in error_line(capsys)
