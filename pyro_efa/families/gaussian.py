"""Gaussian family with identity link: ``eta`` is the mean."""

from __future__ import annotations

import torch
from pyro.distributions import Normal, TorchDistribution
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..errors import InputError
from .base import Family, register_family
from .per_key import per_key_flag

__all__ = ["GaussianFamily"]


@register_family("gaussian")
class GaussianFamily(Family):
    r"""Normal observations whose mean is the natural parameter ``eta`` (identity link).

    .. math::

        p(x \mid \eta) = \frac{1}{\sqrt{2\pi}\,\mathrm{scale}}
            \exp\Big(-\frac{(x - \eta)^2}{2\,\mathrm{scale}^2}\Big).

    With a fixed ``scale`` it is a buffer; otherwise ``scale`` is a learned positive
    :class:`~pyro.nn.PyroParam` initialised to 1 (then to the residual standard deviation by
    :meth:`init_nuisance`), one per key when ``per_key``.

    :param int num_keys: number of keys.
    :param per_key: ``True``: one ``scale`` per key; ``False``: one shared by every key;
        ``"auto"`` (default): per key when every key has at least 20 training observations,
        resolved by :meth:`EFA.from_data <pyro_efa.EFA.from_data>` (see
        :func:`~pyro_efa.families.resolve_per_key`). Ignored when ``scale`` is fixed.
    :type per_key: bool or str
    :param scale: a fixed positive standard deviation, or ``None`` to learn it.
    :type scale: float or None
    """

    support = constraints.real
    is_discrete = False
    standardize = True

    def __init__(self, num_keys: int = 1, per_key: bool | str = "auto", scale: float | None = None) -> None:
        super().__init__(num_keys, per_key_flag(per_key))
        self.fixed_scale = scale is not None
        if scale is not None:
            if not float(scale) > 0:
                raise InputError(f"scale must be positive, got {scale!r}")
            self.register_buffer("scale", torch.tensor(float(scale)))
        else:
            init = torch.ones(self.num_keys) if self.per_key else torch.tensor(1.0)
            self.scale = PyroParam(init, constraint=constraints.positive)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A learned scale back to 1."""
        if not self.fixed_scale:
            self.set_positive("scale", 1.0)

    def scale_for(self, key_index: torch.Tensor) -> torch.Tensor:
        """The standard deviation for each entry of ``key_index`` (a scalar when shared)."""
        scale = self.scale
        return scale if scale.dim() == 0 else scale[key_index]

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        return Normal(eta[..., 0], self.scale_for(key_index).to(eta.dtype))

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean().reshape(1) if x.numel() else x.new_zeros(1)

    @torch.no_grad()
    def init_nuisance(self, residual: torch.Tensor, key_index: torch.Tensor) -> None:
        # start the learned scale at the residual standard deviation (per key when per_key):
        # with a scale of 1 on data of scale 10, Adam needs thousands of steps to get there
        if self.fixed_scale or residual.numel() == 0:
            return
        pooled = residual.pow(2).mean().sqrt().clamp(min=1e-3)
        if self.per_key:
            n = torch.bincount(key_index, minlength=self.num_keys).to(residual.dtype)
            ss = torch.bincount(key_index, weights=residual.pow(2), minlength=self.num_keys).to(
                residual.dtype
            )
            value = torch.where(n >= 2, (ss / n.clamp(min=1)).sqrt().clamp(min=1e-3), pooled)
        else:
            value = pooled
        self.set_positive("scale", value)

    def describe_support(self) -> str:
        return "real numbers"

    def extra_repr(self) -> str:
        fixed = f", scale={float(self.scale)}" if self.fixed_scale else ""
        return super().extra_repr() + fixed
