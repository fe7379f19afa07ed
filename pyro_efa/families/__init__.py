"""Exponential families for EFA observations.

Each family maps the natural parameter ``eta`` predicted by the network to a Pyro distribution
and is registered in :data:`FAMILIES` under its name; :func:`get_family` builds one by name.
"""

from .base import FAMILIES, Family, get_family, register_family
from .bernoulli import BernoulliFamily
from .binomial import BinomialFamily
from .categorical import CategoricalFamily
from .gamma import GammaFamily
from .gaussian import GaussianFamily
from .negative_binomial import NegativeBinomialFamily
from .poisson import PoissonFamily

__all__ = [
    "BernoulliFamily",
    "BinomialFamily",
    "CategoricalFamily",
    "FAMILIES",
    "Family",
    "GammaFamily",
    "GaussianFamily",
    "NegativeBinomialFamily",
    "PoissonFamily",
    "get_family",
    "register_family",
]
