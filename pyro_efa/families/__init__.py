"""Exponential families for EFA observations.

Each family maps the natural parameter ``eta`` predicted by the network to a Pyro distribution
and is registered in :data:`FAMILIES` under its name; :func:`get_family` builds one by name.
Families with a nuisance parameter hold it shared or one per key (``per_key``; the default
``"auto"`` is resolved from the training data: see :func:`resolve_per_key`).
"""

from .base import FAMILIES, Family, get_family, register_family
from .bernoulli import BernoulliFamily
from .binomial import BinomialFamily
from .categorical import CategoricalFamily
from .gamma import GammaFamily
from .gaussian import GaussianFamily
from .negative_binomial import NegativeBinomialFamily
from .per_key import PER_KEY_MIN_COUNT, per_key_flag, resolve_per_key
from .poisson import PoissonFamily
from .tweedie import Tweedie, TweedieFamily, tweedie_log_series

__all__ = [
    "BernoulliFamily",
    "BinomialFamily",
    "CategoricalFamily",
    "FAMILIES",
    "Family",
    "GammaFamily",
    "GaussianFamily",
    "NegativeBinomialFamily",
    "PER_KEY_MIN_COUNT",
    "PoissonFamily",
    "Tweedie",
    "TweedieFamily",
    "get_family",
    "per_key_flag",
    "register_family",
    "resolve_per_key",
    "tweedie_log_series",
]
