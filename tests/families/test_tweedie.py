"""The Tweedie family (compound Poisson-Gamma, 1 < p < 2): the series density against the direct
compound-Poisson sum computed with scipy, total probability and moments by quadrature, samples
against the moment formulas, gradients, the power option and a tiny fit."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, special, stats

import pyro_efa
from pyro_efa import EFA, EFAData
from pyro_efa.families import Tweedie, TweedieFamily, get_family, tweedie_log_series

F64 = torch.float64


def reference_log_prob(x: float, mu: float, phi: float, p: float) -> float:
    """``log sum_N Poisson(N; lam) Gamma(x; N alpha, gamma_scale)`` with scipy (``-lam`` at 0),
    summed over every N that matters: up to far beyond both the Poisson mean and the peak of the
    terms in N."""
    lam = mu ** (2 - p) / (phi * (2 - p))
    alpha = (2 - p) / (p - 1)
    scale = phi * (p - 1) * mu ** (p - 1)
    if x == 0:
        return float(stats.poisson.logpmf(0, lam))
    peak = x ** (2 - p) / (phi * (2 - p))
    top = int(3 * max(lam, peak) + 40 * math.sqrt(max(lam, peak)) + 200)
    n = np.arange(1, top)
    terms = stats.poisson.logpmf(n, lam) + stats.gamma.logpdf(x, a=n * alpha, scale=scale)
    return float(special.logsumexp(terms))


# small and large values, dispersions and powers near both ends of (1, 2)
XS = [0.0, 1e-4, 0.01, 0.5, 1.0, 3.0, 10.0, 50.0, 200.0]
MUS = [0.05, 1.0, 5.0, 100.0]
PHIS = [0.1, 1.0, 5.0]
POWERS = [1.05, 1.3, 1.5, 1.8, 1.95]


@pytest.mark.parametrize("p", POWERS, ids=[f"p={p}" for p in POWERS])
def test_log_prob_matches_compound_poisson_sum(p):
    grid = np.array([(x, mu, phi) for x in XS for mu in MUS for phi in PHIS])
    x, mu, phi = (torch.tensor(grid[:, i], dtype=F64) for i in range(3))
    lp = Tweedie(mu, phi, power=p).log_prob(x).numpy()
    expected = np.array([reference_log_prob(*row, p) for row in grid])
    np.testing.assert_allclose(lp, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("p", [1.05, 1.5, 1.95])
def test_series_window_loses_nothing(p):
    # the window around the largest term against every term j = 1 .. 20000 (the largest terms
    # here lie below j = 2000), each value alone (its own window) and all at once (the widest)
    x = torch.tensor([1e-6, 1e-3, 0.1, 1.0, 7.0, 100.0], dtype=F64)[:, None]
    phi = torch.tensor([0.05, 0.3, 1.0, 10.0], dtype=F64)
    windowed = tweedie_log_series(x, phi, p)
    alone = torch.stack([torch.stack([tweedie_log_series(xi, f, p) for f in phi]) for xi in x[:, 0]])
    torch.testing.assert_close(alone, windowed, rtol=1e-12, atol=1e-12)
    alpha = (2 - p) / (p - 1)
    log_z = alpha * x.log() - phi.log() / (p - 1) - alpha * math.log(p - 1) - math.log(2 - p)
    j = torch.arange(1, 20001, dtype=F64)
    terms = j * log_z[..., None] - torch.lgamma(j + 1) - torch.lgamma(j * alpha)
    torch.testing.assert_close(windowed, terms.logsumexp(-1), rtol=1e-12, atol=1e-12)


CASES = [(0.5, 1.0, 1.2), (3.0, 0.5, 1.5), (1.0, 2.0, 1.8), (20.0, 3.0, 1.4), (0.2, 0.3, 1.6)]


def _density(mu: float, phi: float, p: float):
    d = Tweedie(torch.tensor(mu, dtype=F64), torch.tensor(phi, dtype=F64), power=p)
    return d, lambda x: math.exp(float(d.log_prob(torch.tensor(x, dtype=F64))))


def _integral(f, mu: float) -> float:
    # split at the mean; below it x = u^4 (dx = 4 u^3 du) smooths the density's integrable
    # singularity at 0 (like x^(alpha - 1), alpha = (2 - p) / (p - 1) >= 1/4 for p <= 1.8)
    tol = {"limit": 200, "epsabs": 1e-12, "epsrel": 1e-10}
    lower = integrate.quad(lambda u: f(u**4) * 4 * u**3, 0.0, mu**0.25, **tol)[0]
    upper = integrate.quad(f, mu, math.inf, **tol)[0]
    return lower + upper


@pytest.mark.parametrize("mu, phi, p", CASES, ids=[str(c) for c in CASES])
def test_total_probability_and_moments_by_quadrature(mu, phi, p):
    d, f = _density(mu, phi, p)
    p0 = math.exp(float(d.log_prob(torch.tensor(0.0, dtype=F64))))
    assert p0 + _integral(f, mu) == pytest.approx(1.0, abs=1e-8)
    mean = _integral(lambda x: x * f(x), mu)  # the atom at 0 adds nothing
    second = _integral(lambda x: x * x * f(x), mu)
    assert mean == pytest.approx(mu, rel=1e-7)
    assert second - mean**2 == pytest.approx(phi * mu**p, rel=1e-6)
    assert float(d.mean) == mu and float(d.variance) == pytest.approx(phi * mu**p, rel=1e-12)


@pytest.mark.parametrize("mu, phi, p", CASES, ids=[str(c) for c in CASES])
def test_samples_match_the_moments(mu, phi, p):
    torch.manual_seed(0)
    n = 200_000
    d = Tweedie(torch.tensor(mu, dtype=F64), torch.tensor(phi, dtype=F64), power=p)
    x = d.sample((n,))
    assert x.shape == (n,) and (x >= 0).all()
    var = phi * mu**p
    # tolerances of 5 standard errors: of the mean, of the variance (from the sample's fourth
    # central moment) and of the share of zeros (binomial)
    assert float(x.mean()) == pytest.approx(mu, abs=5 * math.sqrt(var / n))
    m4 = float(((x - x.mean()) ** 4).mean())
    assert float(x.var()) == pytest.approx(var, abs=5 * math.sqrt((m4 - var**2) / n))
    p0 = math.exp(-(mu ** (2 - p)) / (phi * (2 - p)))
    assert float((x == 0).double().mean()) == pytest.approx(p0, abs=5 * math.sqrt(p0 * (1 - p0) / n) + 1e-9)


def test_shapes_expand_and_support():
    mu = torch.tensor([[0.5], [2.0], [9.0]], dtype=F64)
    phi = torch.tensor([0.7, 1.3], dtype=F64)
    d = Tweedie(mu, phi, power=1.4)
    assert d.batch_shape == (3, 2) and d.event_shape == ()
    assert d.sample((5,)).shape == (5, 3, 2)
    assert d.log_prob(torch.tensor(1.0, dtype=F64)).shape == (3, 2)
    e = d.expand((4, 3, 2))
    assert e.batch_shape == (4, 3, 2) and e.power == 1.4
    torch.testing.assert_close(
        e.log_prob(torch.ones(4, 3, 2, dtype=F64))[2], d.log_prob(torch.ones(3, 2, dtype=F64))
    )
    assert d.support.check(torch.tensor([0.0, 3.0])).all()
    assert not d.support.check(torch.tensor(-1.0))
    torch.testing.assert_close(d.variance, phi * mu**1.4)


def test_gradients_finite_and_correct():
    mu = torch.tensor([0.3, 2.0, 2.0, 40.0], dtype=F64, requires_grad=True)
    phi = torch.tensor([0.5, 1.0, 3.0, 0.2], dtype=F64, requires_grad=True)
    x = torch.tensor([0.0, 1.5, 0.0, 35.0], dtype=F64)
    torch.autograd.gradcheck(lambda m, s: Tweedie(m, s, power=1.6).log_prob(x), (mu, phi))
    # through the family: eta and the dispersion, at zeros and positives, extreme eta included
    family = TweedieFamily(num_keys=2, per_key=True, power=1.3)
    eta = torch.tensor([[-1e3], [-2.0], [0.5], [1e3]], dtype=F64, requires_grad=True)
    lp = family.dist(eta, torch.tensor([0, 1, 0, 1])).log_prob(torch.tensor([0.0, 0.2, 4.0, 3.0], dtype=F64))
    lp.sum().backward()
    (raw,) = family.parameters()  # the unconstrained dispersion
    assert torch.isfinite(lp).all() and torch.isfinite(eta.grad).all() and torch.isfinite(raw.grad).all()
    assert raw.grad.ne(0).all()


def test_invalid_values_and_power_option():
    family = get_family("tweedie")
    assert family.invalid(torch.tensor([-1.0, -1e-9, math.nan, math.inf])).all()
    assert not family.invalid(torch.tensor([0.0, 1e-9, 3.5])).any()
    assert family.power == 1.5 and "power=1.5" in repr(family)
    assert get_family("tweedie", power=1.2).power == 1.2
    for bad in (1.0, 2.0, 0.5, 2.5, "x", None, True, math.nan):
        with pytest.raises(ValueError, match="power must be a number strictly between 1 and 2"):
            TweedieFamily(power=bad)
    with pytest.raises(ValueError, match="power"):
        Tweedie(1.0, 1.0, power=2.0)


def _rain_table(num_days: int = 40, seed: int = 0) -> pd.DataFrame:
    """Daily precipitation at three stations: exact zeros and positive reals."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    wet = Tweedie(torch.tensor([0.5, 2.0, 6.0], dtype=F64), torch.tensor(2.0, dtype=F64), power=1.5)
    rain = wet.sample((num_days,)).numpy()
    rows = [
        {"day": day, "station": s, "rain": float(rain[day, i]), "t": float(rng.random())}
        for day in range(num_days)
        for i, s in enumerate(["a", "b", "c"])
    ]
    return pd.DataFrame(rows)


def test_tiny_fit_with_zeros_and_positive_reals():
    df = _rain_table()
    assert (df["rain"] == 0).sum() > 10 and (df["rain"] % 1 != 0).sum() > 10
    data = EFAData.from_pandas(df, "day", "station", "rain", order="t")
    train, test = data.split((0.75, 0.25), seed=0)
    model = EFA.from_data(
        train, family="tweedie", family_options={"tweedie": {"power": 1.4}}, dim=4, head_dim=4
    )
    assert model.config.family_options["tweedie"] == {"power": 1.4, "per_key": True}  # 30 days a station
    fitted = pyro_efa.fit(model, train, num_epochs=3, batch_size=8, progress=False)
    assert all(np.isfinite(fitted.losses))
    metrics = pyro_efa.evaluate(fitted, test)
    assert all(math.isfinite(metrics[k]) for k in ("nll", "mse"))
    family = fitted.efa.families[0]
    assert family.power == 1.4 and family.dispersion.shape == (3,)
    with pytest.raises(ValueError, match="power"):
        EFA.from_data(train, family="tweedie", family_options={"tweedie": {"power": 2.5}})
