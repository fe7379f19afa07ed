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

**Recommended configuration** (chosen on the validation baskets of one seed: ``EXPERIMENT``).
Unidirectional: the paper's architecture (the library's defaults: d = 32, learned
position embedding, 2 layers x 2 heads of width 16, residual adds, no LayerNorm or feed-forward).
Bidirectional: the same with ``context_stream="fixed"`` (each target's query stream attends to
content tokens that are never updated: exact in one pass, NOT the paper's architecture, where the
context tokens also attend to each other and every basket is re-encoded once per target).
``benchmarks/reproduce.py`` runs the paper's architecture beside it, trained on a quarter of each
basket's targets per step (``target_fraction=0.25``, unbiased): about 8 minutes per fit on one
CPU thread, test CE 3.414 over seeds 0-2 against the fixed context's 3.397. EFE via
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

from pathlib import Path

import pandas as pd

from pyro_efa import EFAData
from pyro_efa.models.base import DATA_DIR, Experiment, Splits, parser, run_cli
from pyro_efa.models.baselines import experiment_baselines

__all__ = ["EXPERIMENT", "load"]

FIT = {"lr": 3e-3, "batch_size": 64, "lr_decay": 0.5, "lr_patience": 2, "patience": 8}


def load(data_dir: str | Path = DATA_DIR, seed: int = 42) -> Splits:
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


#: baskets as item sequences over 63 products
EXPERIMENT = Experiment(
    name="instacart",
    metric="nll",
    directions=("uni", "bi"),
    paper={("efa", "uni"): 3.7064, ("efa", "bi"): 3.4200, ("efe", "uni"): 3.7155, ("efe", "bi"): 3.4758},
    loader=load,
    efa={"uni": {}, "bi": {"context_stream": "fixed"}},
    efe={},
    fit={("efa", None): FIT, ("efe", None): FIT},
    kind="items",
    max_len_from_splits=True,
    baselines=experiment_baselines("instacart"),
)


def main(argv: list[str] | None = None) -> int:
    run_cli(EXPERIMENT, parser("EFA and EFE on Instacart baskets.", ["instacart"]).parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
