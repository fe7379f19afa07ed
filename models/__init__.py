"""Ready models for the paper's data sets (installed as :mod:`pyro_efa.models`).

Each experiment of the paper is an :class:`~pyro_efa.models.base.Experiment`: its data (read
from ``../shared/data`` beside the checkout, ``$PYRO_EFA_DATA``, or a path you give), the
recommended EFA and EFE configurations and fit options (chosen on validation units), its metric
and the paper's numbers. :data:`EXPERIMENTS` lists them by name; :func:`get` returns one::

    from pyro_efa.models import get

    exp = get("instacart")
    train, val, test = splits = exp.load()
    model = exp.model("efa", "uni", splits)
    options = exp.fit_options("efa", "uni")

The modules (``synthetic``, ``instacart``, ``movielens``, ``temperature``) hold the loaders, the
baselines of their data sets and a command line each (``python models/movielens.py --task
movielens_items``).
"""

from __future__ import annotations

from . import instacart, movielens, synthetic, temperature
from .base import DATA_DIR, Experiment, Splits, smoke_splits

__all__ = ["DATA_DIR", "EXPERIMENTS", "Experiment", "Splits", "get", "smoke_splits"]

#: every experiment of the paper, by name
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        synthetic.EXPERIMENT,
        instacart.EXPERIMENT,
        movielens.ITEMS,
        movielens.RATINGS,
        *temperature.EXPERIMENTS.values(),
    )
}


def get(name: str) -> Experiment:
    """The experiment ``name`` (a key of :data:`EXPERIMENTS`)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
