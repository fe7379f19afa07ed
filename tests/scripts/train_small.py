"""A small, deterministic EFA fit run as a subprocess by the reliability and distributed tests.

Single process:  python tests/scripts/train_small.py OUT [--checkpoint-dir D --every K --resume]
Distributed:     python -m torch.distributed.run --nproc_per_node 2 tests/scripts/train_small.py OUT

Writes ``OUT`` (the final model and guide state, rank 0 only) with ``torch.save``. ``--sleep``
slows every step down (for the kill test); it does not change any number.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

import pyro_efa
from pyro_efa import EFAData, distributed, fit


def make_data(num_units: int, seed: int = 0) -> EFAData:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_units):
        n = int(rng.integers(1, 7))
        for i, k in enumerate(rng.choice(8, size=n, replace=False)):
            rows.append((u, int(k), i, float(rng.normal(k % 3, 1.0))))
    df = pd.DataFrame(rows, columns=["user", "item", "t", "x"])
    return EFAData.from_pandas(df, unit="user", key="item", value="x", order="t")


class Slow(pyro_efa.EFA):
    """EFA whose every call sleeps a little (gives the kill test time to act)."""

    delay = 0.0

    def forward(self, data, sample=False):  # noqa: ANN001, ANN201
        if self.delay:
            time.sleep(self.delay)
        return super().forward(data, sample=sample)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--units", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--guide", default="map")
    p.add_argument("--val", action="store_true", help="hold out a quarter of the units for early stopping")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    distributed.init_from_env()
    data = make_data(args.units)
    val = None
    if args.val:
        data, val = data.split((0.75, 0.25), seed=0)
    torch.manual_seed(0)  # the network's initial weights
    model = Slow.from_data(data, dim=8, num_layers=1, num_heads=1, head_dim=8, name="efa")
    Slow.delay = args.sleep
    f = fit(
        model, data, guide=args.guide, val_data=val, num_epochs=args.epochs, batch_size=args.batch_size,
        lr=0.01, seed=3, progress=False, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.every,
        resume=args.resume, patience=100,
    )  # fmt: skip
    if distributed.is_main():
        state = {"model": f.model.state_dict(), "guide": f.guide.state_dict()}
        torch.save({"state": state, "losses": f.losses, "val_nll": f.val_nll}, args.out)
    distributed.cleanup()


if __name__ == "__main__":
    main()
