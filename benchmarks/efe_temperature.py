"""Why the first temperature EFE was far from the ridge regression: its model class, fitted directly.

The EFE with uniform attention and mean pooling over the other cities is a low-rank linear model,
``eta_i = b_i + sum_{j != i} W[i, j] x_j`` with ``W[i, j] = rho_i . alpha_j / (n - 1)`` of rank at
most d. This script fits that class by least squares (L-BFGS, full batch) on the training days of
the paper's October data (44 cities), for several ranks, on the standardised temperatures, with
and without a small weight penalty, and by Adam on the raw temperatures in F (as the first EFE
read them), and prints validation and test MSE (F^2 per city-day). ``models/temperature.py``
quotes its numbers.

Run ``python benchmarks/efe_temperature.py`` (seconds); ``--smoke`` for two ranks and few steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pyro_efa.models import DATA_DIR
from pyro_efa.models import temperature as T

__all__ = ["fit_low_rank", "main"]


def fit_low_rank(
    x: np.ndarray,
    train: np.ndarray,
    rank: int,
    standardize: bool = True,
    penalty: float = 0.0,
    adam_steps: int = 0,
    lr: float = 3e-3,
    max_iter: int = 3000,
    seed: int = 0,
) -> np.ndarray:
    """Squared errors ``(days, cities)`` of the rank-``rank`` linear model of the other cities.

    :param x: ``(days, cities)`` temperatures; ``train`` marks the training days.
    :param standardize: read the predictors standardised on the training days (else in F).
    :param penalty: ``penalty * (|rho|^2 + |alpha|^2)`` added to the training MSE.
    :param adam_steps: fit by that many full-batch Adam steps of size ``lr`` (0: L-BFGS).
    """
    torch.manual_seed(seed)
    n = x.shape[1]
    mu, sd = x[train].mean(0), x[train].std(0)
    z = torch.tensor((x - mu) / sd if standardize else x, dtype=torch.float64)
    y = torch.tensor(x, dtype=torch.float64)
    rho = (0.1 * torch.randn(n, rank, dtype=torch.float64)).requires_grad_()
    alpha = (0.1 * torch.randn(n, rank, dtype=torch.float64)).requires_grad_()
    b = torch.tensor(mu.copy()).requires_grad_()
    off = 1 - torch.eye(n, dtype=torch.float64)  # no city predicts itself
    rows = torch.as_tensor(train)

    def predict() -> torch.Tensor:
        return z @ ((rho @ alpha.T) * off / (n - 1)).T + b

    def loss() -> torch.Tensor:
        return ((predict()[rows] - y[rows]) ** 2).mean() + penalty * (
            rho.square().sum() + alpha.square().sum()
        )

    if adam_steps:
        opt = torch.optim.Adam([rho, alpha, b], lr=lr)
        for _ in range(adam_steps):
            opt.zero_grad()
            loss().backward()
            opt.step()
    else:
        lbfgs = torch.optim.LBFGS([rho, alpha, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            value = loss()
            value.backward()
            return value

        lbfgs.step(closure)
    with torch.no_grad():
        return ((predict() - y) ** 2).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--smoke", action="store_true", help="two ranks, few steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    df = T.read_temperatures(args.data_dir, drop_states_with_missing=True)
    wide = df.pivot(index="date", columns="city", values="temperature")
    days = wide.index[wide.index.month == T.PAPER_MONTH]
    x = wide.reindex(days).to_numpy()
    splits = (T.TRAIN_YEARS, T.VAL_YEARS, T.TEST_YEARS)
    train, val, test = (np.isin(days.year, list(years)) for years in splits)
    steps = 20 if args.smoke else 3000
    ranks = (1, 2) if args.smoke else (1, 2, 4, 8, 16, 32, 43)
    runs = [(f"rank {r}, standardised, L-BFGS", {"rank": r}) for r in ranks]
    big = 2 if args.smoke else 32
    runs += [(f"rank {big}, standardised, penalty {p:g}", {"rank": big, "penalty": p}) for p in (1e-4, 1e-3)]
    adam = f"Adam lr 3e-3, {steps} steps"
    runs += [
        (f"rank {big}, raw F, L-BFGS", {"rank": big, "standardize": False}),
        (f"rank {big}, raw F, {adam}", {"rank": big, "standardize": False, "adam_steps": steps}),
        (f"rank {big}, standardised, {adam}", {"rank": big, "adam_steps": steps}),
    ]
    print(
        f"{x.shape[1]} cities; training / validation / test days {train.sum()} / {val.sum()} / {test.sum()}"
    )
    print(f"{'model':<48} {'train':>7} {'val':>7} {'test':>7}")
    for label, options in runs:
        sq = fit_low_rank(x, train, max_iter=steps, **options)
        print(f"{label:<48} " + " ".join(f"{sq[m].mean():7.2f}" for m in (train, val, test)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
