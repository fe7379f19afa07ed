"""pyro_efa: exponential family attention (EFA) as a Pyro model.

EFA models each observation of a unit (a user's ratings, a basket, a day of temperatures) by an
exponential-family distribution whose natural parameter comes from self-attention over the other
observations of that unit.

Importing the package turns on Pyro's ``module_local_params`` setting: parameters live in the
modules (model and guide), not in the global parameter store, so that several fits in one session
never share values through site names.
"""

import pyro

pyro.settings.set(module_local_params=True)

from .data import EFAData, Vocabulary  # noqa: E402
from .families import FAMILIES, Family, get_family, register_family  # noqa: E402
from .infer import EFAFit, evaluate, fit, load, log_likelihood, posterior_predictive, predict, save  # noqa: E402
from .model import EFA  # noqa: E402

__version__ = "0.1.0.dev0"

__all__ = [
    "EFA",
    "EFAData",
    "EFAFit",
    "FAMILIES",
    "Family",
    "Vocabulary",
    "__version__",
    "evaluate",
    "fit",
    "get_family",
    "load",
    "log_likelihood",
    "posterior_predictive",
    "predict",
    "register_family",
    "save",
]
