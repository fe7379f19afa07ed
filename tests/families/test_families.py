"""Tests for the exponential families in :mod:`pyro_efa.families`."""

import math

import numpy as np
import pyro
import pytest
import torch
from scipy import special, stats

import pyro_efa.families as families
from pyro_efa.families import (
    FAMILIES,
    BinomialFamily,
    CategoricalFamily,
    Family,
    GammaFamily,
    GaussianFamily,
    NegativeBinomialFamily,
    TweedieFamily,
    get_family,
)

NAMES = sorted(FAMILIES)
SHAPES = [(), (4,), (3, 2)]
SHAPE_IDS = ["scalar", "4", "3x2"]
OPTIONS = {"categorical": {"num_categories": 4}, "binomial": {"total_count": 5}}
F64 = torch.float64


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def make(name, **options):
    return get_family(name, **{**OPTIONS.get(name, {}), **options})


def keys(shape, num_keys=1):
    return torch.randint(0, num_keys, shape)


def random_eta(family, shape):
    return torch.randn(shape + (family.natural_dim,), dtype=F64)


def valid_values(family, shape):
    if isinstance(family, GaussianFamily):
        return torch.randn(shape, dtype=F64) * 3
    if isinstance(family, GammaFamily):
        return torch.rand(shape, dtype=F64) * 5 + 0.05
    if isinstance(family, TweedieFamily):  # exact zeros and positive reals
        x = torch.rand(shape, dtype=F64) * 5
        return torch.where(torch.rand(shape, dtype=F64) < 0.3, torch.zeros_like(x), x)
    if isinstance(family, CategoricalFamily):
        high = family.num_categories
    elif isinstance(family, BinomialFamily):
        high = family.total_count + 1
    elif family.name == "bernoulli":
        high = 2
    else:
        high = 20
    return torch.randint(0, high, shape).to(F64)


def log_prob(family, eta, x, key_index):
    """log_prob as callers compute it (categorical values are passed as ``long``)."""
    value = x.long() if isinstance(family, CategoricalFamily) else x
    return family.dist(eta, key_index).log_prob(value)


# -- every family ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_registry_and_description(name):
    family = make(name)
    assert isinstance(family, Family)
    assert type(family) is FAMILIES[name]
    assert family.name == name
    assert get_family(family) is family
    text = family.describe_support()
    assert isinstance(text, str) and text and "(" not in text  # a phrase, not a constraint repr
    assert name in repr(family) or type(family).__name__ in repr(family)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_shapes_and_dtype(name, shape):
    torch.manual_seed(0)
    family = make(name)
    eta = random_eta(family, shape)
    d = family.dist(eta, keys(shape))
    assert d.batch_shape == shape
    assert d.event_shape == ()
    lp = log_prob(family, eta, valid_values(family, shape), keys(shape))
    assert lp.shape == shape
    assert lp.dtype == F64
    assert torch.isfinite(lp).all()
    mean = family.mean(eta, keys(shape))
    expected = shape + (family.num_categories,) if isinstance(family, CategoricalFamily) else shape
    assert mean.shape == expected
    assert mean.dtype == F64


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_valid_values_and_samples_accepted(name):
    torch.manual_seed(1)
    family = make(name)
    shape = (50,)
    assert not family.invalid(valid_values(family, shape)).any()
    assert not family.invalid(torch.tensor(family.fill_value, dtype=F64))
    sample = family.dist(random_eta(family, shape), keys(shape)).sample().to(F64)
    assert not family.invalid(sample).any()


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_nan_and_inf_invalid(name):
    family = make(name)
    x = torch.tensor([math.nan, math.inf, -math.inf], dtype=F64)
    assert family.invalid(x).all()


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].is_discrete], ids=lambda n: n)
def test_discrete_families_reject_non_integers_and_negatives(name):
    family = make(name)
    x = torch.tensor([0.0, 1.0, 1.5, 0.5, -1.0, -0.5], dtype=F64)
    assert family.invalid(x).tolist() == [False, False, True, True, True, True]


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_fill_keeps_log_prob_finite(name):
    torch.manual_seed(2)
    family = make(name)
    shape = (3, 4)
    x = valid_values(family, shape)
    x[0, 1] = math.nan
    x[1, 2] = -7.5  # outside every support but the Gaussian's
    x[2, 0] = math.inf
    mask = ~family.invalid(x)
    assert not mask[0, 1] and not mask[2, 0]
    filled = family.fill(x, mask)
    assert torch.equal(filled[mask], x[mask])
    assert (filled[~mask] == family.fill_value).all()
    lp = log_prob(family, random_eta(family, shape), filled, keys(shape))
    assert torch.isfinite(lp).all()


# -- closed forms --------------------------------------------------------------------------------
def scipy_log_prob(family, eta, x):
    """Reference log density from scipy (numpy float64 arrays, eta without the last axis)."""
    if isinstance(family, GaussianFamily):
        return stats.norm.logpdf(x, loc=eta, scale=float(family.scale.detach()))
    if family.name == "poisson":
        return stats.poisson.logpmf(x, np.exp(eta))
    if family.name == "bernoulli":
        return stats.bernoulli.logpmf(x, special.expit(eta))
    if isinstance(family, BinomialFamily):
        return stats.binom.logpmf(x, family.total_count, special.expit(eta))
    if isinstance(family, NegativeBinomialFamily):
        r = float(family.concentration.detach())
        # scipy's p is the probability of the r "successes": p = r / (r + mean)
        return stats.nbinom.logpmf(x, r, r / (r + np.exp(eta)))
    if isinstance(family, GammaFamily):
        k = float(family.concentration.detach())
        return stats.gamma.logpdf(x, a=k, scale=np.exp(eta) / k)
    raise AssertionError(family)


SCIPY_CASES = {
    "gaussian_fixed": lambda: GaussianFamily(scale=0.6),
    "gaussian_learned": lambda: GaussianFamily(),
    "poisson": lambda: make("poisson"),
    "bernoulli": lambda: make("bernoulli"),
    "binomial": lambda: BinomialFamily(total_count=7),
    "negative_binomial": lambda: NegativeBinomialFamily(),
    "gamma": lambda: GammaFamily(),
}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("case", sorted(SCIPY_CASES), ids=sorted(SCIPY_CASES))
def test_log_prob_matches_scipy(case, shape):
    torch.manual_seed(3)
    family = SCIPY_CASES[case]()
    if case == "gaussian_learned":
        family.scale = torch.tensor(1.7)
    elif case == "negative_binomial":
        family.concentration = torch.tensor(3.5)
    elif case == "gamma":
        family.concentration = torch.tensor(0.8)
    eta = random_eta(family, shape)
    x = valid_values(family, shape)
    lp = log_prob(family, eta, x, keys(shape))
    expected = scipy_log_prob(family, eta[..., 0].numpy(), x.numpy())
    np.testing.assert_allclose(lp.detach().numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_categorical_log_prob_matches_log_softmax(shape):
    torch.manual_seed(4)
    family = CategoricalFamily(num_categories=5)
    eta = random_eta(family, shape)
    x = valid_values(family, shape)
    lp = log_prob(family, eta, x, keys(shape))
    eta_np = eta.numpy()
    log_softmax = eta_np - np.log(np.exp(eta_np).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_softmax, x.long().numpy()[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(lp.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_mean_closed_form(name):
    torch.manual_seed(5)
    family = make(name)
    shape = (3, 2)
    eta = random_eta(family, shape)
    mean = family.mean(eta, keys(shape))
    e = eta[..., 0]
    expected = {
        "gaussian": lambda: e,
        "poisson": lambda: e.exp(),
        "negative_binomial": lambda: e.exp(),
        "gamma": lambda: e.exp(),
        "tweedie": lambda: e.exp(),
        "bernoulli": lambda: torch.sigmoid(e),
        "binomial": lambda: family.total_count * torch.sigmoid(e),
        "categorical": lambda: eta.exp() / eta.exp().sum(-1, keepdim=True),
    }[name]()
    torch.testing.assert_close(mean.detach(), expected, rtol=1e-10, atol=1e-12)


def test_log_base_measure():
    x = torch.arange(0.0, 8.0, dtype=F64)
    lbm = get_family("poisson").log_base_measure(x)
    np.testing.assert_allclose(lbm.numpy(), -special.gammaln(x.numpy() + 1), rtol=1e-12)
    assert torch.equal(get_family("negative_binomial").log_base_measure(x), lbm)
    family = BinomialFamily(total_count=7)
    np.testing.assert_allclose(
        family.log_base_measure(x).numpy(), np.log(special.comb(7, x.numpy())), rtol=1e-10
    )
    # log_prob - log h(x) = x * eta - A(eta) for the canonical count families
    eta = torch.tensor([[0.3]], dtype=F64)
    for fam, log_partition in [
        (get_family("poisson"), eta.exp()),
        (family, 7 * torch.nn.functional.softplus(eta)),
    ]:
        lp = log_prob(fam, eta.expand(8, 1), x, keys((8,)))
        torch.testing.assert_close(lp - fam.log_base_measure(x), x * eta[0, 0] - log_partition[0, 0])


# -- the canonical gradient identity -------------------------------------------------------------
CANONICAL = {
    "poisson": lambda: make("poisson"),
    "bernoulli": lambda: make("bernoulli"),
    "binomial": lambda: BinomialFamily(total_count=6),
    "categorical": lambda: CategoricalFamily(num_categories=4),
    "gaussian": lambda: GaussianFamily(scale=1.0),
}


@pytest.mark.parametrize("name", sorted(CANONICAL), ids=sorted(CANONICAL))
def test_score_is_sufficient_statistic_minus_mean(name):
    torch.manual_seed(6)
    family = CANONICAL[name]()
    shape = (3, 2)
    eta = random_eta(family, shape).requires_grad_()
    x = valid_values(family, shape)
    key_index = keys(shape)
    (grad,) = torch.autograd.grad(log_prob(family, eta, x, key_index).sum(), eta)
    mean = family.mean(eta, key_index).detach()
    if isinstance(family, CategoricalFamily):
        t = torch.nn.functional.one_hot(x.long(), family.num_categories).to(F64)
    else:
        t, mean = x[..., None], mean[..., None]
    torch.testing.assert_close(grad, t - mean, rtol=1e-10, atol=1e-12)


# -- support checks per family -------------------------------------------------------------------
INVALID_CASES = {
    "bernoulli": ([0.0, 1.0], [2.0, -1.0, 0.5]),
    "binomial": ([0.0, 3.0, 5.0], [6.0, 5.5, -1.0]),
    "categorical": ([0.0, 3.0], [4.0, -1.0, 1.5]),
    "gamma": ([1e-6, 2.5, 1e6], [0.0, -1.0]),
    "gaussian": ([-1e6, 0.0, 3.3], []),
    "negative_binomial": ([0.0, 1.0, 1e6], [-1.0, 1.5, 2.01]),
    "poisson": ([0.0, 1.0, 1e6], [-1.0, 1.5, 0.01]),
    "tweedie": ([0.0, 1e-6, 2.5, 1e6], [-1.0, -1e-6]),
}


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_invalid_cases(name):
    family = make(name)
    good, bad = INVALID_CASES[name]
    assert not family.invalid(torch.tensor(good, dtype=F64)).any()
    assert family.invalid(torch.tensor(bad, dtype=F64)).all()


def test_describe_support_phrases():
    assert get_family("poisson").describe_support() == "non-negative integers"
    assert get_family("bernoulli").describe_support() == "0 or 1"
    assert CategoricalFamily(num_categories=3).describe_support() == "integers 0..2"
    assert BinomialFamily(total_count=4).describe_support() == "integers 0..4"
    assert get_family("gamma").describe_support() == "positive reals"
    assert get_family("tweedie").describe_support() == "non-negative reals"


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_categories"):
        CategoricalFamily(num_categories=1)
    with pytest.raises(ValueError, match="total_count"):
        BinomialFamily(total_count=0)
    with pytest.raises(ValueError, match="scale"):
        GaussianFamily(scale=0.0)
    assert CategoricalFamily(num_categories=6).natural_dim == 6


def test_large_eta_stays_finite():
    # Poisson, Gamma and Tweedie clamp eta on both sides; the negative binomial only above (its log_prob
    # works on the logits, so a very negative eta is harmless).
    eta = torch.tensor([[1e3], [-1e3]], dtype=F64, requires_grad=True)
    for name in ["poisson", "negative_binomial", "gamma", "tweedie"]:
        family = make(name)
        x = torch.tensor([3.0, 3.0], dtype=F64)
        lp = log_prob(family, eta, x, keys((2,)))
        (grad,) = torch.autograd.grad(lp.sum(), eta)
        assert torch.isfinite(lp).all() and torch.isfinite(grad).all(), name


# -- parameters ----------------------------------------------------------------------------------
def test_default_parameters():
    assert get_family("gaussian").scale.item() == pytest.approx(1.0)
    assert get_family("negative_binomial").concentration.item() == pytest.approx(10.0)
    assert get_family("gamma").concentration.item() == pytest.approx(2.0)
    assert get_family("tweedie").dispersion.item() == pytest.approx(1.0)
    fixed = GaussianFamily(scale=0.5)
    assert "scale" in dict(fixed.named_buffers())
    assert not list(fixed.parameters())
    assert len(list(GaussianFamily().parameters())) == 1
    assert GaussianFamily(num_keys=3, per_key=True).scale.shape == (3,)
    assert get_family("gamma", num_keys=3).concentration.shape == ()


PER_KEY = {
    "gaussian": ("scale", lambda d: d.scale),
    "negative_binomial": ("concentration", lambda d: d.total_count),
    "gamma": ("concentration", lambda d: d.concentration),
    "tweedie": ("dispersion", lambda d: d.phi),
}


@pytest.mark.parametrize("name", sorted(PER_KEY), ids=sorted(PER_KEY))
def test_per_key_parameters(name):
    torch.manual_seed(7)
    attr, read = PER_KEY[name]
    family = get_family(name, num_keys=3, per_key=True)
    assert getattr(family, attr).shape == (3,)
    values = torch.tensor([0.5, 2.0, 8.0])
    setattr(family, attr, values)
    key_index = torch.tensor([[2, 0], [1, 2]])
    d = family.dist(random_eta(family, (2, 2)), key_index)
    torch.testing.assert_close(read(d), values[key_index].to(F64))
    # gradients reach only the keys that were used
    lp = family.dist(random_eta(family, (2,)), torch.tensor([1, 1])).log_prob(torch.ones(2, dtype=F64))
    lp.sum().backward()
    (param,) = family.parameters()
    assert param.grad[1] != 0 and param.grad[0] == 0 and param.grad[2] == 0


# -- registry ------------------------------------------------------------------------------------
def test_get_family_errors_and_aliases():
    with pytest.raises(ValueError, match="unknown family 'nope'") as info:
        get_family("nope")
    for name in NAMES:
        assert name in str(info.value)
    assert isinstance(get_family("Negative-Binomial"), NegativeBinomialFamily)
    assert get_family("categorical", num_categories=3).num_categories == 3


def test_public_names():
    assert families.__all__ == sorted(families.__all__)
    assert set(NAMES) == {
        "bernoulli",
        "binomial",
        "categorical",
        "gamma",
        "gaussian",
        "negative_binomial",
        "poisson",
        "tweedie",
    }
    for name in families.__all__:
        assert hasattr(families, name)
