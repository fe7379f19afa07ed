"""Poisson family with log link: ``eta`` is the log rate."""

from __future__ import annotations

import torch
from pyro.distributions import Poisson, TorchDistribution
from torch.distributions import constraints

from .base import Family, register_family

__all__ = ["PoissonFamily"]

# Pyro's Poisson takes the rate, not its log, so eta must be exponentiated. exp overflows to inf
# in float32 for eta > ~88, which turns log_prob and its gradients into NaN. A rate of exp(30)
# (about 1e13) is far above any realistic count, so clamping there only affects runaway fits.
# At the other end exp underflows to 0 (eta < ~-103 in float32), and then the gradient of
# x * log(rate) is 0 / 0 = NaN even at x = 0; exp(-80) is still a normal float32.
_MAX_ETA = 30.0
_MIN_ETA = -80.0


@register_family("poisson")
class PoissonFamily(Family):
    r"""Poisson counts with the canonical log link.

    .. math::

        p(x \mid \eta) = \frac{1}{x!} \exp\big(x \eta - e^{\eta}\big),
        \qquad x \in \{0, 1, 2, \dots\}.

    ``eta`` is clamped to ``[-80, 30]`` before exponentiating (see the comment in the source).
    """

    support = constraints.nonnegative_integer
    is_discrete = True

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        return Poisson(torch.exp(eta[..., 0].clamp(_MIN_ETA, _MAX_ETA)))

    def log_base_measure(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.lgamma(x + 1)

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        # log of the mean count, kept finite for all-zero keys
        return (x.mean().clamp(min=1e-3) if x.numel() else x.new_ones(())).log().reshape(1)

    def describe_support(self) -> str:
        return "non-negative integers"
