"""Binomial family with logit link and a known number of trials."""

from __future__ import annotations

import torch
from pyro.distributions import Binomial, TorchDistribution
from torch.distributions import constraints

from ..errors import InputError
from .base import Family, register_family

__all__ = ["BinomialFamily"]


@register_family("binomial")
class BinomialFamily(Family):
    r"""Successes out of ``total_count`` known trials, with the canonical logit link.

    .. math::

        p(x \mid \eta) = \binom{\mathrm{total\_count}}{x}
            \exp\big(x \eta - \mathrm{total\_count} \log(1 + e^{\eta})\big),
        \qquad x \in \{0, \dots, \mathrm{total\_count}\}.

    :param int num_keys: number of keys.
    :param bool per_key: unused (no nuisance parameter).
    :param int total_count: number of trials, at least 1.
    """

    is_discrete = True

    def __init__(self, num_keys: int = 1, per_key: bool = False, total_count: int = 1) -> None:
        if int(total_count) != total_count or total_count < 1:
            raise InputError(f"total_count must be an integer >= 1, got {total_count!r}")
        super().__init__(num_keys, per_key)
        self.total_count = int(total_count)
        # the support depends on the instance, so it shadows the class attribute
        self.support = constraints.integer_interval(0, self.total_count)

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        return Binomial(total_count=self.total_count, logits=eta[..., 0])

    def log_base_measure(self, x: torch.Tensor) -> torch.Tensor:
        n = float(self.total_count)
        return torch.lgamma(torch.full_like(x, n + 1)) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        p = (x.mean() / self.total_count).clamp(1e-3, 1 - 1e-3) if x.numel() else x.new_tensor(0.5)
        return torch.logit(p).reshape(1)

    def describe_support(self) -> str:
        return f"integers 0..{self.total_count}"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", total_count={self.total_count}"
