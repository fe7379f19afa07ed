"""Negative-binomial family with log link and a learned dispersion."""

from __future__ import annotations

import torch
from pyro.distributions import NegativeBinomial, TorchDistribution
from pyro.nn import PyroParam
from torch.distributions import constraints

from .base import Family, register_family
from .per_key import per_key_flag

__all__ = ["NegativeBinomialFamily"]

# exp(eta) would overflow for large eta (see the Poisson family); a mean of exp(30) is plenty.
_MAX_ETA = 30.0


@register_family("negative_binomial")
class NegativeBinomialFamily(Family):
    r"""Over-dispersed counts: ``eta`` is the log mean, ``concentration`` the dispersion.

    With :math:`\mu = e^{\eta}` and :math:`r = \mathrm{concentration}`,

    .. math::

        p(x \mid \eta) = \frac{\Gamma(x + r)}{\Gamma(r)\, x!}
            \Big(\frac{r}{r + \mu}\Big)^{r} \Big(\frac{\mu}{r + \mu}\Big)^{x},
        \qquad x \in \{0, 1, 2, \dots\},

    so the mean is :math:`\mu` and the variance :math:`\mu + \mu^2 / r`. It is
    ``NegativeBinomial(total_count=r, logits=eta - log r)``; ``eta`` is clamped to at most 30.
    ``concentration`` is a learned positive :class:`~pyro.nn.PyroParam` initialised to 10,
    one per key when ``per_key`` (default ``"auto"``: per key when every key has at least 20
    training observations; see :func:`~pyro_efa.families.resolve_per_key`). :meth:`log_base_measure` is
    :math:`-\log x!`, the part of the density free of both ``eta`` and ``concentration`` (the same
    as the Poisson's).
    """

    support = constraints.nonnegative_integer
    is_discrete = True

    def __init__(self, num_keys: int = 1, per_key: bool | str = "auto") -> None:
        super().__init__(num_keys, per_key_flag(per_key))
        shape = (self.num_keys,) if self.per_key else ()
        self.concentration = PyroParam(torch.full(shape, 10.0), constraint=constraints.positive)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The concentration back to its initial 10.0."""
        self.set_positive("concentration", 10.0)

    def concentration_for(self, key_index: torch.Tensor) -> torch.Tensor:
        """The dispersion ``r`` for each entry of ``key_index`` (a scalar when shared)."""
        r = self.concentration
        return r if r.dim() == 0 else r[key_index]

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        r = self.concentration_for(key_index).to(eta.dtype)
        return NegativeBinomial(total_count=r, logits=eta[..., 0].clamp(max=_MAX_ETA) - torch.log(r))

    def log_base_measure(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.lgamma(x + 1)

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        # log of the mean count, kept finite for all-zero keys
        return (x.mean().clamp(min=1e-3) if x.numel() else x.new_ones(())).log().reshape(1)

    def describe_support(self) -> str:
        return "non-negative integers"
