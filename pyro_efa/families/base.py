"""Base class and registry for exponential families.

A family maps the network output ``eta`` (the natural parameter, on the scale of the family's
natural link) to a :class:`pyro.distributions.TorchDistribution`, and checks that observed values
lie in its support. Families with extra parameters (a Gaussian scale, a negative-binomial
dispersion, a Gamma shape) hold them as :class:`~pyro.nn.PyroParam` point estimates, shared or
one per key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule
from torch.distributions import constraints, transform_to

from ..errors import InputError

__all__ = ["FAMILIES", "Family", "get_family", "register_family"]


class Family(PyroModule):
    r"""An exponential family with its natural (canonical or log-mean) link.

    Observation ``x`` with natural parameter ``eta`` has density

    .. math::

        p(x \mid \eta) = h(x) \exp\big(\eta^\top t(x) - A(\eta)\big),

    where for families with a nuisance parameter (scale, dispersion, shape) ``eta`` is the
    parameter the network predicts (the mean or log-mean) and the nuisance parameter is a point
    estimate held by the family.

    Subclasses set the class attributes and implement :meth:`dist`. What the rest of the library
    needs to know about a family it reads from these declarations, never from the family's name:
    :attr:`natural_dim` (the size of ``eta``), :attr:`standardize` (whether ``eta`` is a mean on
    the value's scale that may be predicted on a standardised scale), :attr:`predicts_class` (class
    labels: predicted by the most likely class, scored by accuracy), :meth:`options_from_data`
    (options read off the training values, such as the number of classes) and
    :meth:`point_prediction`.

    :param int num_keys: number of keys; per-key parameters get one entry per key.
    :param bool per_key: whether the nuisance parameter (if any) is one per key.
    """

    #: registry name
    name: ClassVar[str] = ""
    #: the support of observed values
    support: ClassVar[constraints.Constraint] = constraints.real
    #: whether values are integers (stored as floats in :class:`~pyro_efa.data.EFAData`)
    is_discrete: ClassVar[bool] = False
    #: a value inside the support, used to fill masked (padding) positions before ``log_prob``
    fill_value: ClassVar[float] = 0.0
    #: whether ``eta[..., 0]`` is the mean in the value's units, so that a model may predict it on
    #: a standardised scale (``value_center[k] + value_scale[k] * eta``; see :class:`EFAConfig`)
    standardize: ClassVar[bool] = False
    #: whether values are class labels: the point prediction is the most likely class (with its
    #: probability) and the metric is accuracy rather than squared error
    predicts_class: ClassVar[bool] = False

    def __init__(self, num_keys: int = 1, per_key: bool = False) -> None:
        self.num_keys = int(num_keys)
        self.per_key = bool(per_key)
        super().__init__()

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def natural_dim(self) -> int:
        """Length of the natural parameter of one observation (1 for scalar families)."""
        return 1

    # -- the distribution ----------------------------------------------------------------------
    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        """The conditional distribution of values with natural parameters ``eta``.

        :param ~torch.Tensor eta: shape ``batch + (natural_dim,)``.
        :param ~torch.Tensor key_index: integer keys, shape ``batch`` (used by per-key parameters).
        :returns: a distribution with ``batch_shape == batch`` and ``event_shape == ()``.
        """
        raise NotImplementedError

    def mean(self, eta: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
        """Mean of :meth:`dist` (for categorical: the expected class probabilities)."""
        return self.dist(eta, key_index).mean

    def point_prediction(self, d: TorchDistribution) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The point prediction of each value under ``d`` (from :meth:`dist`), and for class labels
        the probability of the predicted class (``None`` otherwise). The default is the mean."""
        return d.mean, None

    def rank(self, d: TorchDistribution, x: torch.Tensor) -> torch.Tensor | None:
        """For class labels: the rank of each observed class ``x`` among all classes under ``d``
        (1 for the most likely class), for recall@k and NDCG@k; ``None`` (the default) for
        families without a ranking."""
        return None

    @classmethod
    def options_from_data(cls, x: torch.Tensor, classes: Sequence[int | None]) -> dict[str, Any]:
        """Options of the family read off the training data, used by :meth:`EFA.from_data` for the
        options the user did not give (e.g. the number of classes). The default is none.

        :param ~torch.Tensor x: the training values (1-D) of the family's keys.
        :param classes: one entry per key of the model: the size of the key's class vocabulary
            when its values are class labels (:attr:`EFAData.classes`), else ``None``.
        """
        return {}

    def reset_parameters(self) -> None:
        """Set the nuisance parameters (if any) back to their initial values."""

    @torch.no_grad()
    def set_positive(self, name: str, value: float | torch.Tensor) -> None:
        """Set the positive :class:`~pyro.nn.PyroParam` ``name`` to ``value`` (broadcast to its
        shape), through its unconstrained storage."""
        raw = getattr(self, f"{name}_unconstrained")
        value = torch.as_tensor(value, dtype=raw.dtype, device=raw.device)
        raw.copy_(transform_to(constraints.positive).inv(value).expand_as(raw))

    def as_observation(self, x: torch.Tensor) -> torch.Tensor:
        """Values (stored as floats) in the dtype :meth:`dist` expects (long for class indices)."""
        return x

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        """Natural parameter ``(natural_dim,)`` of the best constant fit to values ``x`` (1-D).

        Used to initialise intercepts; the default is zeros.
        """
        return x.new_zeros(self.natural_dim)

    def init_nuisance(self, residual: torch.Tensor, key_index: torch.Tensor) -> None:
        """Initialise nuisance parameters (scale, dispersion, shape) from the residuals
        ``x - mean`` of the best constant fit per key, with their keys. The default does nothing.
        """

    def log_base_measure(self, x: torch.Tensor) -> torch.Tensor:
        r"""``log h(x)``: the part of ``log_prob`` that does not depend on the parameters
        (for example ``-log x!`` for the Poisson). Metrics "without the base measure" subtract it.
        """
        return torch.zeros_like(x)

    # -- support checks ------------------------------------------------------------------------
    def invalid(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of values outside the support (NaN and inf always count as invalid)."""
        bad = ~torch.isfinite(x)
        ok = self.support.check(torch.where(bad, torch.full_like(x, self.fill_value), x))
        return bad | ~ok

    def describe_support(self) -> str:
        """Human-readable support for error messages."""
        return str(self.support)

    def fill(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` where ``mask`` holds, :attr:`fill_value` elsewhere (keeps ``log_prob`` finite)."""
        return torch.where(mask, x, torch.full_like(x, self.fill_value))

    def extra_repr(self) -> str:
        return f"num_keys={self.num_keys}, per_key={self.per_key}"


#: the registered families by name (:func:`register_family` adds one, :func:`get_family` builds one)
FAMILIES: dict[str, type[Family]] = {}


def register_family(name: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator adding a :class:`Family` subclass to :data:`FAMILIES` under ``name``."""

    def decorator(cls: type[Family]) -> type[Family]:
        if name in FAMILIES:
            raise InputError(f"family {name!r} is already registered")
        cls.name = name
        FAMILIES[name] = cls
        return cls

    return decorator


def get_family(name: str | Family, **options: Any) -> Family:
    """Build a family by registry name, or return ``name`` if it already is a :class:`Family`.

    :raises ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(name, Family):
        return name
    key = str(name).lower().replace("-", "_")
    if key not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise InputError(f"unknown family {name!r}; known families: {known}")
    return FAMILIES[key](**options)
