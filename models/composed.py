r"""EFA composed with other terms in a larger Pyro model, through the public composition API
(:meth:`EFA.natural_params <pyro_efa.EFA.natural_params>`, :meth:`EFA.observe
<pyro_efa.EFA.observe>`), as a user would write it.

:class:`EFAPlusLinear` adds to EFA's natural parameter a linear term of the *other*
observations of the unit, the model class of a per-key ridge regression:

.. math:: \eta_i = \eta^{\mathrm{EFA}}_i + \sum_{k} W[k_i, k]\, z_k, \qquad
    z_k = (x_k - \mathrm{center}[k]) / \mathrm{scale}[k], \qquad W[k, k] = 0,

with ``z_k`` the standardised value of key ``k`` in the unit (0, its training mean, when the unit
has no observation of ``k``) and ``W ~ Normal(0, prior_scale)``, a ridge penalty under MAP. A key
never predicts itself, so ``eta_i`` does not depend on ``x_i``. The term reads every observation
of the unit, earlier or later, so it is for bidirectional models (a pseudo-likelihood) and for
data with at most one observation of each key per unit (one reading per city and day); both are
checked.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample

from pyro_efa import EFA, EFAData
from pyro_efa.errors import InputError

__all__ = ["EFAPlusLinear", "LinearContext"]


class LinearContext(PyroModule):
    """``lin_i = sum_k W[k_i, k] z_k`` over the other keys ``k`` of the unit (see the module).

    :param int num_keys: number of keys.
    :param ~torch.Tensor center: ``(num_keys,)`` value centres (e.g. ``efa.value_center``).
    :param ~torch.Tensor scale: ``(num_keys,)`` value scales (e.g. ``efa.value_scale``).
    :param float prior_scale: standard deviation of the ``Normal`` prior of every ``W[k, k']``.
    """

    def __init__(self, num_keys: int, center: torch.Tensor, scale: torch.Tensor, prior_scale: float) -> None:
        super().__init__()
        if prior_scale <= 0:
            raise InputError(f"prior_scale must be positive, got {prior_scale!r}")
        self.num_keys = num_keys
        self.register_buffer("center", center.detach().clone())
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("off_diagonal", 1 - torch.eye(num_keys, dtype=center.dtype))
        self.W = PyroSample(dist.Normal(0.0, prior_scale).expand([num_keys, num_keys]).to_event(2))

    def forward(self, data: EFAData) -> torch.Tensor:
        """``(B, L, 1)``: the linear term of every observation of ``data``."""
        z = (data.values - self.center[data.key_index]) / self.scale[data.key_index] * data.mask
        dense = torch.zeros(z.size(0), self.num_keys, dtype=z.dtype, device=z.device)
        dense = dense.scatter_add(1, data.key_index, z)  # (B, K): each key's standardised value
        per_key = dense @ (self.W * self.off_diagonal).T  # (B, K): the term of each key
        return per_key.gather(1, data.key_index).unsqueeze(-1)


class EFAPlusLinear(PyroModule):
    """``x_i ~ Family(eta_efa_i + lin_i)``: a bidirectional EFA plus :class:`LinearContext`.

    :param EFA efa: a bidirectional EFA of valued data (its name prefixes its sites).
    :param float prior_scale: prior scale of the linear term's weights.
    """

    def __init__(self, efa: EFA, prior_scale: float = 0.3) -> None:
        super().__init__()
        config = efa.config
        if config.kind != "valued" or config.direction != "bi":
            raise InputError(
                "EFAPlusLinear reads every other observation of a unit: it needs a bidirectional EFA "
                f"of valued data, got kind={config.kind!r}, direction={config.direction!r}"
            )
        self.efa = efa
        self.linear = LinearContext(config.num_keys, efa.value_center, efa.value_scale, prior_scale)

    def validate(self, data: EFAData) -> None:
        """:meth:`EFA.validate`, and at most one observation of each key per unit."""
        self.efa.validate(data)
        padding = -1 - torch.arange(data.key_index.size(1)).expand_as(data.key_index)  # all distinct
        keys = torch.where(data.mask, data.key_index, padding).sort(dim=1).values
        repeated = (keys[:, 1:] == keys[:, :-1]).any(1)
        if repeated.any():
            unit = int(repeated.nonzero()[0])
            raise InputError(
                f"unit {data.unit_labels[unit]!r} has two observations of one key: the linear term "
                "of EFAPlusLinear holds one value per key and unit"
            )

    def forward(self, data: EFAData, sample: bool = False) -> torch.Tensor:
        select, weights = self.efa.target_subset(data)  # the EFA's target_fraction, if any
        eta = self.efa.natural_params(data, select=select)
        return self.efa.observe(data, eta + self.linear(data), sample=sample, select=select, weights=weights)
