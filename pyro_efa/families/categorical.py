"""Categorical family with softmax link: ``eta`` holds one logit per class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pyro.distributions import Categorical, TorchDistribution
from torch.distributions import constraints

from ..errors import InputError
from .base import Family, register_family

__all__ = ["CategoricalFamily"]


@register_family("categorical")
class CategoricalFamily(Family):
    r"""Class labels ``0 .. num_categories - 1`` with the canonical softmax link.

    ``eta`` has ``num_categories`` entries per observation, and

    .. math::

        p(x = c \mid \eta) = \exp\Big(\eta_c - \log \sum_{j=0}^{\mathrm{num\_categories} - 1}
            e^{\eta_j}\Big).

    Values are stored as floats holding integers; :meth:`as_observation` turns them into longs for
    :meth:`dist`'s ``log_prob``. :meth:`mean` returns the class probabilities.

    :param int num_keys: number of keys.
    :param bool per_key: unused (no nuisance parameter).
    :param int num_categories: number of classes, at least 2.
    :param key_classes: optional, one entry per key: how many classes the key has (its class
        vocabulary; at most ``num_categories``); classes beyond get probability 0 for that key.
    """

    is_discrete = True
    predicts_class = True

    def __init__(
        self,
        num_keys: int = 1,
        per_key: bool = False,
        num_categories: int = 2,
        key_classes: Sequence[int] | None = None,
    ) -> None:
        if int(num_categories) != num_categories or num_categories < 2:
            raise InputError(f"num_categories must be an integer >= 2, got {num_categories!r}")
        super().__init__(num_keys, per_key)
        self.num_categories = int(num_categories)
        beyond = None
        if key_classes is not None:
            if len(key_classes) != self.num_keys or not all(1 <= c <= num_categories for c in key_classes):
                raise InputError(
                    f"key_classes needs one count in 1..{num_categories} per key ({self.num_keys}), "
                    f"got {list(key_classes)}"
                )
            # (keys, classes): True where a class lies beyond the key's vocabulary
            beyond = torch.arange(self.num_categories) >= torch.tensor(list(key_classes))[:, None]
        self.register_buffer("key_classes", beyond, persistent=False)
        # the support depends on the instance, so it shadows the class attribute
        self.support = constraints.integer_interval(0, self.num_categories - 1)

    @property
    def natural_dim(self) -> int:
        return self.num_categories

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        if self.key_classes is not None:  # classes a key does not have
            eta = eta.masked_fill(self.key_classes[key_index], -math.inf)
        return Categorical(logits=eta)

    def mean(self, eta: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``softmax(eta)``, shape ``batch + (num_categories,)``."""
        return torch.softmax(eta, dim=-1)

    def point_prediction(self, d: TorchDistribution) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The most likely class (as a float, like the stored values) and its probability."""
        prob, label = d.probs.max(-1)
        return label.to(prob.dtype), prob

    def rank(self, d: TorchDistribution, x: torch.Tensor) -> torch.Tensor:
        """``1 +`` the number of classes strictly more likely than the observed class ``x`` (long
        class indices): 1 when ``x`` is the most likely class. Classes a key does not have (and
        items excluded by the context) have probability 0 and never rank above ``x``."""
        logits = d.logits
        observed = logits.gather(-1, x.unsqueeze(-1))
        return 1 + (logits > observed).sum(-1)

    @classmethod
    def options_from_data(cls, x: torch.Tensor, classes: Sequence[int | None]) -> dict[str, Any]:
        """``num_categories``: one more than the largest class index seen, or the largest class
        vocabulary (at least 2); ``key_classes`` when keys have class vocabularies of other sizes."""
        sizes = [c for c in classes if c is not None]
        n = max([2, int(x.max()) + 1 if x.numel() else 2, *sizes])
        out: dict[str, Any] = {"num_categories": n}
        if sizes and any(c != n for c in sizes):
            out["key_classes"] = [n if c is None else c for c in classes]
        return out

    def as_observation(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        # log class frequencies with one pseudo-count per class
        counts = torch.bincount(x.long(), minlength=self.num_categories).to(x.dtype)
        return torch.log((counts + 1) / (counts.sum() + self.num_categories))

    def describe_support(self) -> str:
        return f"integers 0..{self.num_categories - 1}"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_categories={self.num_categories}"
