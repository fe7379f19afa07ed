"""Gamma family with log link and a learned shape."""

from __future__ import annotations

import torch
from pyro.distributions import Gamma, TorchDistribution
from pyro.nn import PyroParam
from torch.distributions import constraints

from .base import Family, register_family
from .per_key import per_key_flag

__all__ = ["GammaFamily"]

# rate = k * exp(-eta) overflows to inf (or underflows to 0, outside Gamma's rate constraint) for
# large |eta|; means between exp(-30) and exp(30) cover any sensible data.
_MAX_ABS_ETA = 30.0


@register_family("gamma")
class GammaFamily(Family):
    r"""Positive observations: ``eta`` is the log mean, ``concentration`` the shape.

    With :math:`\mu = e^{\eta}` and :math:`k = \mathrm{concentration}`,

    .. math::

        p(x \mid \eta) = \frac{1}{\Gamma(k)} \Big(\frac{k}{\mu}\Big)^{k} x^{k - 1}
            \exp\Big(-\frac{k x}{\mu}\Big), \qquad x > 0,

    so the mean is :math:`\mu` and the variance :math:`\mu^2 / k`. It is
    ``Gamma(concentration=k, rate=k * exp(-eta))`` with ``eta`` clamped to ``[-30, 30]``.
    ``concentration`` is a learned positive :class:`~pyro.nn.PyroParam` initialised to 2, one
    per key when ``per_key`` (default ``"auto"``: per key when every key has at least 20 training
    observations; see :func:`~pyro_efa.families.resolve_per_key`). Masked positions are filled with 1.
    """

    support = constraints.positive
    is_discrete = False
    fill_value = 1.0

    def __init__(self, num_keys: int = 1, per_key: bool | str = "auto") -> None:
        super().__init__(num_keys, per_key_flag(per_key))
        shape = (self.num_keys,) if self.per_key else ()
        self.concentration = PyroParam(torch.full(shape, 2.0), constraint=constraints.positive)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The concentration back to its initial 2.0."""
        self.set_positive("concentration", 2.0)

    def concentration_for(self, key_index: torch.Tensor) -> torch.Tensor:
        """The shape ``k`` for each entry of ``key_index`` (a scalar when shared)."""
        k = self.concentration
        return k if k.dim() == 0 else k[key_index]

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        k = self.concentration_for(key_index).to(eta.dtype)
        eta = eta[..., 0].clamp(-_MAX_ABS_ETA, _MAX_ABS_ETA)
        return Gamma(concentration=k, rate=k * torch.exp(-eta))

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean() if x.numel() else x.new_ones(())).log().reshape(1)

    def describe_support(self) -> str:
        return "positive reals"
