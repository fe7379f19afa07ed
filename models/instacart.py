"""Instacart baskets: EFA against the EFE baseline on item sequences.

**Data.** ``instacart/data_train_final.csv`` (24,781 baskets, 275,345 rows) and
``instacart/data_test_final.csv`` (1,433 baskets, 16,066 rows), from the Instacart Market Basket
Analysis restricted to 63 popular products and baskets of at least 10 of them, as preprocessed for
the EFA paper. Columns: ``order_id`` (the basket, one unit), ``product_id`` (1..63, the item) and
``rank`` (position in the basket, 1-based; the add-to-cart order). The files are read from a path
and never copied.

**Protocol (SPEC section 2).** Each basket is an item sequence ordered by ``rank``, modelled by a
categorical over the 63 products. The given train/test files are kept; 25% of the training baskets
(by basket, seed 42) are held out for early stopping. The test baskets are built with the
training item vocabulary (``items=train.items``). Metric: test cross-entropy in nats per item
(``evaluate()["nll"]``).

**Paper's numbers** (uni / bi, single unseeded runs): EFA 3.7064 / 3.4200; EFE baseline
3.7155 / 3.4758 (without intercept in the official code; here every model has one).

**Recommended configuration** (chosen on the validation baskets of one seed: ``EFA_OPTIONS``,
``FIT_OPTIONS``). Unidirectional: the paper's architecture (the library's defaults: d = 32, learned
position embedding, 2 layers x 2 heads of width 16, residual adds, no LayerNorm or feed-forward).
Bidirectional: the same with ``context_stream="fixed"`` (each target's query stream attends to
content tokens that are never updated: exact in one pass, NOT the paper's architecture, where the
context tokens also attend to each other and every basket is re-encoded once per target, about 11
times the cost: hours on a CPU, so the paper's bidirectional architecture is not run here). EFE via
``EFA.efe`` (sum of the context items' embeddings). A batch holds whole baskets with all their
targets: Adam lr 3e-3, batch 64 baskets (about 700 targets), the learning rate halved after
3 epochs without validation improvement (``lr_decay=0.5, lr_patience=2``), patience 8. Validation
CE of seed 0: uni 3.7215 (constant lr 3e-3 with patience 5: 3.7314; halving after 2 epochs: 3.7229,
after every bad epoch: 3.7398, after 4 with patience 10: 3.7216; 3 layers, d = 64, dropout 0.1 at
constant lr: 3.7304, not worth its cost), bi 3.4353 (constant lr); EFE 3.7316 (uni; 3.7371 at
constant lr). EFE gets the same fit options as EFA.

Run ``python models/instacart.py``; ``--smoke`` for a seconds-long check of the pipeline.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import pandas as pd
import pyro

from pyro_efa import EFA, EFAData, evaluate, fit

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

METRIC = "nll"
PAPER = {("EFA", "uni"): 3.7064, ("EFA", "bi"): 3.4200, ("EFE", "uni"): 3.7155, ("EFE", "bi"): 3.4758}
EFA_OPTIONS = {"uni": {}, "bi": {"context_stream": "fixed"}}
FIT_OPTIONS = {"lr": 3e-3, "batch_size": 64, "lr_decay": 0.5, "lr_patience": 2, "patience": 8}
SMOKE_SIZES = (32, 16, 16)  # train, validation, test units under --smoke
SMOKE_MODEL = {"dim": 8, "num_layers": 1, "num_heads": 1, "head_dim": 8}


def load(data_dir: str | Path = DATA_DIR, seed: int = 42) -> tuple[EFAData, EFAData, EFAData]:
    """Train, validation and test baskets (item sequences over 63 products, ordered by rank).

    :param seed: seed of the 75% / 25% train / validation split of the training baskets.
    """
    folder = Path(data_dir) / "instacart"
    train_df = pd.read_csv(folder / "data_train_final.csv")
    test_df = pd.read_csv(folder / "data_test_final.csv")
    # item sequences: the product column holds the items, ``rank`` orders each basket
    train_all = EFAData.from_pandas(train_df, unit="order_id", key="product_id", order="rank")
    test = EFAData.from_pandas(
        test_df, unit="order_id", key="product_id", order="rank", items=train_all.items
    )
    train, val = train_all.split((0.75, 0.25), seed=seed)
    return train, val, test


def efa_model(train: EFAData, direction: str, max_len: int | None = None, **overrides) -> EFA:
    """The recommended EFA (``EFA_OPTIONS``; ``overrides`` replace any option). ``max_len``: the
    longest basket of all splits (the position embedding must cover the test baskets too)."""
    options = {**EFA_OPTIONS[direction], **overrides}
    return EFA.from_data(train, direction=direction, max_len=max_len or train.max_len, **options)


def efe_model(train: EFAData, direction: str, **overrides) -> EFA:
    """The EFE baseline as a configuration of EFA (no positions), with an intercept."""
    return EFA.efe(train, direction=direction, **overrides)


def fit_options(model: str = "efa", direction: str = "uni", **context) -> dict:
    """The recommended :func:`pyro_efa.fit` options of one model (``"efa"`` or ``"efe"``) and
    direction (chosen on the validation units)."""
    return dict(FIT_OPTIONS)


def _head(data: EFAData, n: int) -> EFAData:
    return data.subset(range(min(n, len(data))), reindex=True)


def _summary(name: str, direction: str, scores: list[float], paper: float | None) -> str:
    mean = statistics.fmean(scores)
    sd = statistics.stdev(scores) if len(scores) > 1 else math.nan
    ref = f"{paper:>8.4f}" if paper is not None else f"{'-':>8}"
    runs = " ".join(f"{s:.4f}" for s in scores)
    return f"{name:<5} {direction:<4} {mean:>8.4f} {sd:>7.4f} {ref}   {runs}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="EFA and EFE on Instacart baskets.")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder holding instacart/")
    parser.add_argument("--direction", nargs="+", choices=("uni", "bi"), default=["uni", "bi"])
    parser.add_argument("--guide", choices=("map", "normal", "lowrank"), default="map")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fit seeds")
    parser.add_argument("--max-epochs", type=int, default=100, help="early stopping may end sooner")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, 1 epoch")
    args = parser.parse_args(argv)

    train, val, test = load(args.data_dir)
    overrides: dict = {}
    max_epochs = args.max_epochs
    if args.smoke:
        train, val, test = (_head(d, n) for d, n in zip((train, val, test), SMOKE_SIZES, strict=True))
        overrides, max_epochs = SMOKE_MODEL, 1
    max_len = max(d.max_len for d in (train, val, test))
    print(f"Instacart: train {train}\n  validation {val}\n  test {test}")
    print(f"test {METRIC} (cross-entropy, nats) over seeds {args.seeds}, guide {args.guide}, {FIT_OPTIONS}")
    print(f"{'model':<5} {'dir':<4} {'mean':>8} {'sd':>7} {'paper':>8}   per seed")
    for direction in args.direction:
        for name in ("EFA", "EFE"):
            scores = []
            for seed in args.seeds:
                pyro.set_rng_seed(seed)  # network initialisation
                if name == "EFA":
                    model = efa_model(train, direction, max_len=max_len, **overrides)
                else:
                    model = efe_model(train, direction, **overrides)
                fitted = fit(
                    model, train, guide=args.guide, val_data=val, num_epochs=max_epochs, seed=seed,
                    progress=not args.smoke, **fit_options(name.lower(), direction),
                )  # fmt: skip
                scores.append(evaluate(fitted, test)[METRIC])
            print(_summary(name, direction, scores, PAPER[name, direction]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
