"""Data-parallel training: the sharding arithmetic in one process, and a real 2-process gloo run
(``torch.distributed.run``) against a 1-process run with the same global batch and seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_efa import EFA, EFAData, distributed
from pyro_efa.distributed import UnitScale
from pyro_efa.guides import make_guide

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_small.py"
# Tolerance of the 2-process vs 1-process comparison (float64): only the order of floating-point
# sums differs (DDP's all-reduce, the split of each batch). Measured: max |difference| of any
# parameter about 2e-16 after 12 Adam steps.
ATOL = 1e-10


def test_shard_covers_every_unit_once() -> None:
    for size in (1, 2, 3, 4):
        for global_batch in range(1, 12):
            parts = [distributed.shard(global_batch, r, size) for r in range(size)]
            real = [idx for idx, factor in parts if factor > 0]
            seen = torch.cat(real).tolist() if real else []
            assert sorted(seen) == list(range(global_batch))
            # the factors turn N / B_r into W * N / B_global
            for idx, factor in parts:
                if factor > 0:
                    assert factor == pytest.approx(size * len(idx) / global_batch)
                else:
                    assert idx.tolist() == [0]


def test_not_distributed_without_torchrun(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_from_env() is False
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.device() == torch.device("cpu")
    assert distributed.describe() == "single process"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5, WORLD_SIZE=2"):
        distributed.init_from_env()


def _data() -> EFAData:
    rng = np.random.default_rng(0)
    rows = [
        (u, int(k), i, float(rng.normal(k % 3, 1.0)))
        for u in range(40)
        for i, k in enumerate(rng.choice(8, size=int(rng.integers(1, 7)), replace=False))
    ]
    df = pd.DataFrame(rows, columns=["user", "item", "t", "x"])
    return EFAData.from_pandas(df, unit="user", key="item", value="x", order="t")


@pytest.mark.parametrize("world, global_batch", [(2, 7), (3, 7), (4, 3)])
def test_averaged_shard_gradients_equal_the_global_batch_gradient(world: int, global_batch: int) -> None:
    """What DDP computes (the mean over processes of each shard's gradient, shards scaled by
    :func:`distributed.shard`) is the one-process gradient of the global batch, priors included,
    also when the batch does not split evenly or a process gets no unit."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = _data()
        model = EFA.from_data(data, dim=4, num_layers=1, num_heads=1, head_dim=4, name="efa")
        loss_fn = Trace_ELBO()(model, make_guide(model, "map"))
        batch = data.subset(torch.arange(5, 5 + global_batch))
        loss_fn(batch)

        def grads(b: EFAData, factor: float | None) -> list[torch.Tensor]:
            loss_fn.zero_grad()
            if factor is None:
                loss_fn(b).backward()
            else:
                with UnitScale("efa.units", factor):
                    loss_fn(b).backward()
            return [p.grad.clone() for p in loss_fn.parameters()]

        full = grads(batch, None)
        shards = []
        for r in range(world):
            idx, factor = distributed.shard(global_batch, r, world)
            shards.append(grads(batch.subset(idx), factor))
        for i, g in enumerate(full):
            mean = sum(s[i] for s in shards) / world
            torch.testing.assert_close(mean, g, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(old)


def _run(args: list[str], timeout: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    """``torch.distributed.run --nproc_per_node 2`` with batch 8 per process ends where one process
    with batch 16 ends (same seed): parameters within ATOL, same loss and validation history.

    87 units, a quarter held out: 65 training units, so the last global batch has one unit and
    process 1 gets none; the validation units are split between the processes."""
    common = ["--units", "87", "--val", "--epochs", "3", "--dtype", "float64"]
    _run([sys.executable, str(SCRIPT), str(tmp_path / "one.pt"), "--batch-size", "16", *common], 60)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*launcher, str(SCRIPT), str(tmp_path / "two.pt"), "--batch-size", "8", *common], 120)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-12)
    np.testing.assert_allclose(two["val_nll"], one["val_nll"], rtol=1e-12)
    worst = 0.0
    for part in ("model", "guide"):
        assert one["state"][part].keys() == two["state"][part].keys()
        for k, v in one["state"][part].items():
            assert v.dtype == two["state"][part][k].dtype
            if v.is_floating_point():
                worst = max(worst, float((v - two["state"][part][k]).abs().max()))
    assert worst < ATOL, worst
    # and training moved the parameters far more than that
    assert one["losses"][0] != one["losses"][-1]
