"""pyro_efa: exponential family attention (EFA) as a Pyro model.

EFA models each observation of a unit (a user's ratings, a basket, a day of temperatures) by an
exponential-family distribution whose natural parameter comes from self-attention over the other
observations of that unit.

Importing the package turns on Pyro's ``module_local_params`` setting: parameters live in the
modules (model and guide), not in the global parameter store, so that several fits in one session
never share values through site names.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

import pyro

pyro.settings.set(module_local_params=True)

from .checkpoint import load_checkpoint  # noqa: E402
from .config import EFAConfig, FitOptions  # noqa: E402
from .data import EFAData, PrecisionWarning, Vocabulary  # noqa: E402
from .errors import InputError  # noqa: E402
from .families import FAMILIES, Family, get_family, register_family  # noqa: E402
from .guides import make_guide  # noqa: E402
from .infer import fit  # noqa: E402
from .model import EFA  # noqa: E402
from .predictive import (  # noqa: E402
    evaluate,
    interval_coverage,
    log_likelihood,
    posterior_predictive,
    predict,
)
from .results import EFAFit  # noqa: E402
from .serialization import load, save  # noqa: E402
from .streaming import StreamingUnits  # noqa: E402

try:  # one version source: the package metadata (pyproject.toml)
    __version__ = _version("pyro-efa")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "EFA",
    "EFAConfig",
    "EFAData",
    "EFAFit",
    "FAMILIES",
    "Family",
    "FitOptions",
    "InputError",
    "PrecisionWarning",
    "StreamingUnits",
    "Vocabulary",
    "__version__",
    "evaluate",
    "interval_coverage",
    "fit",
    "get_family",
    "load",
    "load_checkpoint",
    "log_likelihood",
    "make_guide",
    "posterior_predictive",
    "predict",
    "register_family",
    "save",
]
