"""Bernoulli family with logit link: ``eta`` is the log odds."""

from __future__ import annotations

import torch
from pyro.distributions import Bernoulli, TorchDistribution
from torch.distributions import constraints

from .base import Family, register_family

__all__ = ["BernoulliFamily"]


@register_family("bernoulli")
class BernoulliFamily(Family):
    r"""Binary observations with the canonical logit link.

    .. math::

        p(x \mid \eta) = \exp\big(x \eta - \log(1 + e^{\eta})\big), \qquad x \in \{0, 1\}.
    """

    support = constraints.boolean
    is_discrete = True

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        return Bernoulli(logits=eta[..., 0])

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        # logit of the frequency, kept finite for keys that are always 0 or always 1
        p = x.mean().clamp(1e-3, 1 - 1e-3) if x.numel() else x.new_tensor(0.5)
        return torch.logit(p).reshape(1)

    def describe_support(self) -> str:
        return "0 or 1"
