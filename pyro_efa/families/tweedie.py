r"""Tweedie family (compound Poisson-Gamma, ``1 < power < 2``) with log link and a learned
dispersion: exact zeros and positive reals, such as daily precipitation or spending.

The density of the positive values has no closed form: its normalising series is summed around
its largest term, as Dunn and Smyth [1] do (:func:`tweedie_log_series`).

**References**

1. P. K. Dunn and G. K. Smyth, "Series evaluation of Tweedie exponential dispersion model
   densities", *Statistics and Computing* 15 (2005), 267-280.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.distributions import TorchDistribution
from pyro.nn import PyroParam
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from ..errors import InputError
from .base import Family, register_family
from .per_key import per_key_flag

__all__ = ["Tweedie", "TweedieFamily", "tweedie_log_series"]

# exp(eta) overflows for large |eta| (see the Gamma family); means between exp(-30) and exp(30)
# cover any sensible data.
_MAX_ABS_ETA = 30.0
# half-width of the series window in standard deviations of the term index j (plus a constant for
# small j_max): the log terms fall like a Gaussian of sd sqrt(j_max (p - 1)) around j_max, so 10 sd
# are 50 nats below the largest term, far below float64 precision (37 nats).
_WINDOW_SDS = 10.0
_WINDOW_EXTRA = 10
# more terms than this means j_max (p - 1) > 2.5e7: a dispersion so small for the values that the
# distribution is nearly a point mass (a runaway fit); refused rather than run out of memory
_MAX_HALF_WIDTH = 50_000


def _check_power(power: Any) -> float:
    """``power`` as a float in the open interval (1, 2), else an :class:`InputError` naming it."""
    try:
        p = float(power)
    except (TypeError, ValueError):
        p = math.nan
    if isinstance(power, bool) or not 1.0 < p < 2.0:
        raise InputError(
            f"power must be a number strictly between 1 and 2 (the compound Poisson-Gamma range), "
            f"got {power!r}"
        )
    return p


def _half_width(j_max: torch.Tensor, p: float) -> int:
    """Half-width of the series window: ``10 sd + 10`` terms for the widest finite element."""
    spread = _WINDOW_SDS * (j_max * (p - 1.0)).sqrt()
    spread = spread[torch.isfinite(spread)]  # NaN / inf parameters give NaN anyway
    half = (int(math.ceil(float(spread.max()))) if spread.numel() else 0) + _WINDOW_EXTRA
    if half > _MAX_HALF_WIDTH:
        raise ValueError(
            f"the Tweedie series needs {2 * half + 1} terms (the dispersion is tiny for the values: "
            f"the distribution is nearly a point mass); at most {2 * _MAX_HALF_WIDTH + 1} are summed"
        )
    return half


def tweedie_log_series(x: torch.Tensor, phi: torch.Tensor, power: float) -> torch.Tensor:
    r"""``log W(x, phi, p)``, the normalising series of the Tweedie density at ``x > 0``.

    With ``alpha = (2 - p) / (p - 1)`` (the Gamma shape of one summand),

    .. math::

        W = \sum_{j \ge 1} \frac{z^j}{j!\, \Gamma(j\, \mathrm{alpha})}, \qquad
        \log z = \mathrm{alpha} \log x - \frac{\log \mathrm{phi}}{p - 1}
            - \mathrm{alpha} \log(p - 1) - \log(2 - p),

    (the series of Dunn and Smyth 2005, written with the Poisson-Gamma parameters). The terms peak
    near ``j_max = x^(2 - p) / (phi (2 - p))`` and fall like a Gaussian of standard deviation
    ``sqrt(j_max (p - 1))`` around it; the sum runs over the integers ``j >= 1`` within
    ``10 sd + 10`` of the peak (one window, as wide as the widest element needs), summed with
    ``logsumexp``. Differentiable in ``phi``; the window itself is chosen without gradients.

    :param ~torch.Tensor x: positive values, any shape.
    :param ~torch.Tensor phi: dispersions, broadcastable to ``x``.
    :param float power: ``p`` in (1, 2).
    :returns: ``log W``, the shape of ``x`` and ``phi`` broadcast.
    """
    p = _check_power(power)
    x, phi = torch.broadcast_tensors(x, phi)
    if x.numel() == 0:
        return x.new_zeros(x.shape)
    alpha = (2.0 - p) / (p - 1.0)
    log_z = alpha * x.log() - phi.log() / (p - 1.0) - alpha * math.log(p - 1.0) - math.log(2.0 - p)
    with torch.no_grad():
        log_j_max = (2.0 - p) * x.log() - phi.log() - math.log(2.0 - p)
        j_max = log_j_max.exp().clamp(min=1.0).round()
        half = _half_width(j_max, p)
        offsets = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
        j = j_max.unsqueeze(-1) + offsets  # (..., 2 half + 1)
        outside = j < 1  # the series starts at j = 1 (j = 0 is the point mass at zero)
        j = j.clamp(min=1.0)
    terms = j * log_z.unsqueeze(-1) - torch.lgamma(j + 1.0) - torch.lgamma(j * alpha)
    return terms.masked_fill(outside, -math.inf).logsumexp(-1)


class Tweedie(TorchDistribution):
    r"""Tweedie distribution with ``1 < power < 2``: a Poisson number of Gamma summands.

    With ``lam = mu^(2 - p) / (phi (2 - p))``, ``alpha = (2 - p) / (p - 1)`` and
    ``gamma_scale = phi (p - 1) mu^(p - 1)``, a value is the sum of ``N ~ Poisson(lam)`` draws of
    ``Gamma(alpha, scale=gamma_scale)`` (0 when ``N = 0``). Its mean is ``mu``, its variance
    ``phi mu^p``, and

    .. math::

        \log p(0) = -\mathrm{lam}, \qquad
        \log p(x) = -\frac{x}{\mathrm{gamma\_scale}} - \mathrm{lam} - \log x
            + \log W(x, \mathrm{phi}, p) \quad (x > 0),

    with :func:`tweedie_log_series` ``W``. It has an atom at 0 and a density on the positive
    reals; ``log_prob`` returns the log mass at 0 and the log density elsewhere (the measure
    "counting at 0 plus Lebesgue" under which they form one density).

    :param mu: mean, positive.
    :param phi: dispersion, positive.
    :param float power: ``p``, strictly between 1 and 2.
    """

    arg_constraints = {"mu": constraints.positive, "phi": constraints.positive}
    support = constraints.nonnegative
    has_rsample = False

    def __init__(
        self,
        mu: torch.Tensor | float,
        phi: torch.Tensor | float,
        power: float = 1.5,
        validate_args: bool | None = None,
    ) -> None:
        self.mu, self.phi = broadcast_all(mu, phi)
        self.power = _check_power(power)
        super().__init__(self.mu.shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: Any = None) -> Tweedie:
        new = self._get_checked_instance(Tweedie, _instance)
        batch_shape = torch.Size(batch_shape)
        new.mu = self.mu.expand(batch_shape)
        new.phi = self.phi.expand(batch_shape)
        new.power = self.power
        super(Tweedie, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.phi * self.mu.pow(self.power)

    @property
    def rate(self) -> torch.Tensor:
        """``lam``: the Poisson mean of the number of Gamma summands (``P(0) = exp(-lam)``)."""
        p = self.power
        return self.mu.pow(2.0 - p) / (self.phi * (2.0 - p))

    @property
    def gamma_scale(self) -> torch.Tensor:
        """``gamma_scale``: the scale of each Gamma summand."""
        p = self.power
        return self.phi * (p - 1.0) * self.mu.pow(p - 1.0)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        p = self.power
        with torch.no_grad():
            lam = self.rate.expand(shape)
            count = torch.poisson(lam)
            alpha = (2.0 - p) / (p - 1.0)
            # Gamma(0) is not a distribution: draw with shape 1 where N = 0, then put 0 there
            shape_n = torch.where(count > 0, count * alpha, torch.ones_like(count))
            unit = torch.distributions.Gamma(shape_n, torch.ones_like(shape_n)).sample()
            return torch.where(count > 0, unit * self.gamma_scale.expand(shape), torch.zeros_like(unit))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value, mu, phi = broadcast_all(value, self.mu, self.phi)
        dtype = torch.promote_types(torch.promote_types(value.dtype, mu.dtype), phi.dtype)
        value, mu, phi = value.to(dtype), mu.to(dtype), phi.to(dtype)
        p = self.power
        lam = mu.pow(2.0 - p) / (phi * (2.0 - p))
        positive = value > 0
        # 1 stands in for x where x = 0, so that log x and its gradient stay finite there
        x = torch.where(positive, value, torch.ones_like(value))
        log_w = torch.zeros_like(lam).masked_scatter(
            positive, tweedie_log_series(x[positive], phi[positive], p)
        )
        log_density = -x / (phi * (p - 1.0) * mu.pow(p - 1.0)) - lam - x.log() + log_w
        return torch.where(positive, log_density, -lam)


@register_family("tweedie")
class TweedieFamily(Family):
    r"""Exact zeros and positive reals: ``eta`` is the log mean, ``dispersion`` the dispersion.

    With :math:`\mu = e^{\eta}`, :math:`\phi = \mathrm{dispersion}` and ``power`` :math:`p`
    (fixed, :math:`1 < p < 2`), a value is a :class:`Tweedie`: a Poisson number of Gamma
    summands, zero with probability

    .. math::

        p(0 \mid \eta) = \exp\Big(-\frac{\mu^{2 - p}}{\phi\, (2 - p)}\Big),

    positive otherwise, with mean :math:`\mu` and variance :math:`\phi \mu^p`. ``p`` near 1
    behaves like an over-dispersed Poisson (many zeros, lumpy positives), near 2 like a Gamma
    (few zeros). It is ``Tweedie(mu=exp(eta), phi=dispersion, power=power)`` with ``eta``
    clamped to ``[-30, 30]``. ``dispersion`` is a learned positive :class:`~pyro.nn.PyroParam`
    initialised to 1, one per key when ``per_key`` (``"auto"``: see
    :func:`~pyro_efa.families.resolve_per_key`). Masked positions are filled with 0. The density's
    normalising series depends on ``dispersion``, so there is no base measure free of the
    parameters (:meth:`log_base_measure` is 0).

    :param int num_keys: number of keys.
    :param per_key: one ``dispersion`` per key (``True``), shared (``False``) or ``"auto"``.
    :type per_key: bool or str
    :param float power: the Tweedie power ``p``, strictly between 1 and 2 (default 1.5).
    """

    support = constraints.nonnegative
    is_discrete = False
    fill_value = 0.0

    def __init__(self, num_keys: int = 1, per_key: bool | str = "auto", power: float = 1.5) -> None:
        p = _check_power(power)
        super().__init__(num_keys, per_key_flag(per_key))
        self.power = p
        shape = (self.num_keys,) if self.per_key else ()
        self.dispersion = PyroParam(torch.full(shape, 1.0), constraint=constraints.positive)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The dispersion back to its initial 1.0."""
        self.set_positive("dispersion", 1.0)

    def dispersion_for(self, key_index: torch.Tensor) -> torch.Tensor:
        """The dispersion ``phi`` for each entry of ``key_index`` (a scalar when shared)."""
        phi = self.dispersion
        return phi if phi.dim() == 0 else phi[key_index]

    def dist(self, eta: torch.Tensor, key_index: torch.Tensor) -> TorchDistribution:
        phi = self.dispersion_for(key_index).to(eta.dtype)
        mu = eta[..., 0].clamp(-_MAX_ABS_ETA, _MAX_ABS_ETA).exp()
        return Tweedie(mu, phi, power=self.power)

    def initial_eta(self, x: torch.Tensor) -> torch.Tensor:
        # log of the mean, kept finite for all-zero keys
        return (x.mean().clamp(min=1e-3) if x.numel() else x.new_ones(())).log().reshape(1)

    def describe_support(self) -> str:
        return "non-negative reals"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", power={self.power:g}"
