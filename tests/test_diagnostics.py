"""Tests for :mod:`pyro_efa.diagnostics`: InferenceData layout, pointwise log-likelihood identities,
LOO / WAIC / compare, PIT calibration, figures, attention maps, and a NUTS cross-check (slow)."""

import dataclasses
import math
import time

import matplotlib
import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from helpers import RandomIntercept, loglik_by_hand
from matplotlib.figure import Figure
from pyro import poutine
from scipy import stats

from pyro_efa import EFA, EFAData, fit, log_likelihood, posterior_predictive
from pyro_efa.diagnostics import (
    az,
    compare,
    embedding_summary,
    natural_param_draws,
    pit,
    plot_attention,
    plot_pit,
    plot_ppc,
    to_inference_data,
)
from pyro_efa.guides import make_guide
from pyro_efa.results import EFAFit

matplotlib.use("Agg")

SMALL = dict(dim=4, num_layers=1, num_heads=1, head_dim=4)
S = 20  # guide draws
GROUPS = {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data"}
PARETO = "ignore:Estimated shape parameter of Pareto:UserWarning"
WAIC = "ignore:For one or more samples the posterior variance:UserWarning"


def _counts(num_units: int = 80, seed: int = 0) -> EFAData:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_units):
        n = rng.integers(1, 7)
        for i, k in enumerate(rng.choice(8, size=n, replace=False)):
            rows.append((f"u{u}", int(k), i, int(rng.poisson(1 + k % 3))))
    df = pd.DataFrame(rows, columns=["user", "item", "t", "count"])
    return EFAData.from_pandas(df, unit="user", key="item", value="count", order="t")


def _fit(data: EFAData, guide: str = "map", seed: int = 0, efe: bool = False, **kwargs) -> EFAFit:
    pyro.set_rng_seed(seed)  # the network's initial weights
    model = EFA.efe(data, family="poisson", dim=4) if efe else EFA.from_data(data, family="poisson", **SMALL)
    options = dict(num_epochs=2, batch_size=16, lr=0.01, progress=False, seed=seed)
    options.update(kwargs)
    return fit(model, data, guide=guide, **options)


@pytest.fixture(scope="module")
def counts() -> tuple[EFAData, EFAData]:
    data = _counts()
    train, test = data.split((0.7, 0.3), seed=0)
    return train, dataclasses.replace(test, keys=train.keys)


@pytest.fixture(scope="module")
def fits(counts) -> dict[str, EFAFit]:
    train, _ = counts
    return {guide: _fit(train, guide) for guide in ("map", "normal", "lowrank")}


def _targets(data: EFAData) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.nonzero(data.target & data.mask, as_tuple=True)


# ----------------------------------------------------------------------------------------------
# InferenceData layout
@pytest.mark.parametrize("guide", ["map", "normal", "lowrank"])
def test_groups_dims_and_shapes(counts, fits, guide: str) -> None:
    train, test = counts
    idata = to_inference_data(fits[guide], test, num_samples=S)
    assert set(idata.groups()) == GROUPS
    draws = 1 if guide == "map" else S
    K, N = len(train.keys), test.num_observations
    post = idata.posterior
    for name in ("alpha", "rho"):
        assert post[name].dims == ("chain", "draw", "key", "latent")
        assert post[name].shape == (1, draws, K, SMALL["dim"])
    assert post.coords["key"].values.tolist() == train.keys.labels
    ll = idata.log_likelihood["x"]
    assert ll.dims == ("chain", "draw", "obs") and ll.shape == (1, draws, N)
    assert ll.dtype == np.float64 and np.isfinite(ll.values).all()
    # MAP: the plug-in predictive still has num_samples draws
    pp = idata.posterior_predictive["x"]
    assert pp.dims == ("chain", "draw", "obs") and pp.shape == (1, S, N)
    assert pp.dtype == np.int64 and (pp.values >= 0).all()
    u, p = _targets(test)
    assert idata.observed_data["x"].values.tolist() == test.values[u, p].long().tolist()
    const = idata.constant_data
    assert const["unit_index"].values.tolist() == u.tolist()
    assert const["position"].values.tolist() == p.tolist()
    assert const["key_index"].values.tolist() == test.key_index[u, p].tolist()
    assert set(const["family"].values.tolist()) == {"poisson"}
    assert ll.coords["unit"].values.tolist() == [test.unit_labels[i] for i in u.tolist()]
    assert ll.coords["key"].values.tolist() == [test.keys.labels[k] for k in test.key_index[u, p].tolist()]
    assert idata.attrs["guide"] == guide
    assert idata.attrs["point_estimate"] == (guide == "map")


def test_seeded_and_restores_rng(counts, fits) -> None:
    _, test = counts
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = to_inference_data(fits["normal"], test, num_samples=5, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = to_inference_data(fits["normal"], test, num_samples=5, seed=3)
    c = to_inference_data(fits["normal"], test, num_samples=5, seed=4)
    np.testing.assert_array_equal(a.posterior["alpha"].values, b.posterior["alpha"].values)
    np.testing.assert_array_equal(a.posterior_predictive["x"].values, b.posterior_predictive["x"].values)
    assert not np.array_equal(a.posterior["alpha"].values, c.posterior["alpha"].values)


def test_netcdf_round_trip(counts, fits, tmp_path) -> None:
    _, test = counts
    idata = to_inference_data(fits["map"], test, num_samples=3)
    idata.to_netcdf(tmp_path / "idata.nc")
    back = az.from_netcdf(tmp_path / "idata.nc")
    assert set(back.groups()) == GROUPS
    assert back.attrs["guide"] == "map" and back.attrs["point_estimate"] == 1
    np.testing.assert_array_equal(back.log_likelihood["x"].values, idata.log_likelihood["x"].values)


@pytest.mark.parametrize("guide", ["map", "normal"])
def test_batches_do_not_change_the_loglik(counts, fits, guide: str) -> None:
    # several batches: the guide's plate subsample must not leak into later batches
    _, test = counts
    whole = to_inference_data(fits[guide], test, num_samples=4)
    batched = to_inference_data(fits[guide], test, num_samples=4, batch_size=5)
    np.testing.assert_allclose(
        batched.log_likelihood["x"].values, whole.log_likelihood["x"].values, rtol=1e-5
    )
    np.testing.assert_array_equal(batched.posterior["alpha"].values, whole.posterior["alpha"].values)


def test_larger_model_with_per_unit_latents(counts) -> None:
    train, _ = counts
    pyro.set_rng_seed(0)
    efa = EFA.from_data(train, family="poisson", name="efa", **SMALL)
    f = fit(RandomIntercept(efa, scale=1.0), train, guide="normal", num_epochs=1, progress=False)
    whole = to_inference_data(f, train, num_samples=3)
    assert whole.posterior["efa.alpha"].dims == ("chain", "draw", "key", "latent")
    assert whole.posterior["u"].dims == ("chain", "draw", "unit", "u_dim_1")
    assert whole.posterior.coords["unit"].values.tolist() == train.unit_labels
    # per-unit draws are cut to each batch's units
    batched = to_inference_data(f, train, num_samples=3, batch_size=7)
    np.testing.assert_allclose(
        batched.log_likelihood["x"].values, whole.log_likelihood["x"].values, rtol=1e-5
    )


def test_items_and_mixed_families() -> None:
    rng = np.random.default_rng(0)
    # item sequences: alpha and rho are per item
    items = pd.DataFrame(
        [(u, i, f"item{rng.integers(6)}") for u in range(20) for i in range(rng.integers(1, 5))],
        columns=["basket", "pos", "item"],
    )
    data = EFAData.from_pandas(items, unit="basket", key="item", order="pos")
    pyro.set_rng_seed(0)
    f = fit(EFA.from_data(data, **SMALL), data, num_epochs=1, progress=False)
    idata = to_inference_data(f, data, num_samples=4)
    assert idata.posterior["alpha"].dims == ("chain", "draw", "item", "latent")
    assert idata.posterior.coords["item"].values.tolist() == data.items.labels
    assert idata.posterior_predictive["x"].dtype == np.int64
    # a gaussian key and a categorical key: several readout rows per categorical key
    rows = []
    for u in range(20):
        rows.append((u, "temp", 0, rng.normal(15, 3)))
        rows.append((u, "sky", 1, int(rng.integers(3))))
    df = pd.DataFrame(rows, columns=["day", "var", "t", "x"])
    data = EFAData.from_pandas(df, unit="day", key="var", value="x", order="t")
    pyro.set_rng_seed(0)
    model = EFA.from_data(data, family={"temp": "gaussian", "sky": "categorical"}, **SMALL)
    f = fit(model, data, num_epochs=1, progress=False)
    idata = to_inference_data(f, data, num_samples=4)
    assert idata.posterior["rho"].dims == ("chain", "draw", "readout_row", "latent")
    assert idata.posterior.coords["readout_row"].values.tolist() == ["sky:0", "sky:1", "sky:2", "temp"]
    assert idata.posterior["alpha"].dims == ("chain", "draw", "key", "latent")
    assert idata.log_likelihood["x"].shape == (1, 1, 40)
    assert sorted(set(idata.constant_data["family"].values.tolist())) == ["categorical", "gaussian"]
    fig = plot_ppc(idata)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2


# ----------------------------------------------------------------------------------------------
# pointwise log-likelihood
def test_loglik_map_equals_plugin_exactly(counts, fits) -> None:
    _, test = counts
    idata = to_inference_data(fits["map"], test, num_samples=2)
    ll = log_likelihood(fits["map"], test)
    u, p = _targets(test)
    np.testing.assert_array_equal(idata.log_likelihood["x"].values[0, 0], ll[u, p].double().numpy())
    assert idata.log_likelihood["x"].values.sum() == pytest.approx(float(ll.sum()), rel=1e-6)


@pytest.mark.parametrize("guide", ["normal", "lowrank"])
def test_loglik_draws_match_model(counts, fits, guide: str) -> None:
    _, test = counts
    f = fits[guide]
    idata = to_inference_data(f, test, num_samples=S, seed=5)
    ll = idata.log_likelihood["x"].values[0]  # (S, N)
    u, p = _targets(test)
    # the same guide draws as plain Pyro traces make them: per draw, and their mean
    draws = loglik_by_hand(f, test, S, seed=5)[:, u, p].double().numpy()
    np.testing.assert_allclose(ll, draws, rtol=1e-6)
    np.testing.assert_allclose(ll.mean(0), draws.mean(0), rtol=1e-6)
    # log-mean-exp over draws is the Monte Carlo predictive density of log_likelihood()
    total = log_likelihood(f, test, num_samples=S, seed=5)
    lppd = (torch.logsumexp(torch.from_numpy(ll), 0) - math.log(S)).sum()
    assert float(lppd) == pytest.approx(float(total.sum()), rel=1e-6)


def test_chains_from_independent_fits(counts, fits) -> None:
    train, test = counts
    other = _fit(train, "normal", seed=1)
    idata = to_inference_data(fits["normal"], test, num_samples=S, chains=[other], include_eta=True)
    assert idata.posterior.sizes["chain"] == 2 and idata.log_likelihood["x"].shape[:2] == (2, S)
    assert idata.attrs["num_fits"] == 2
    assert idata.posterior["eta"].dims == ("chain", "draw", "obs")
    rhat = az.rhat(idata, var_names=["eta"])["eta"].values
    assert rhat.shape == (test.num_observations,) and np.isfinite(rhat).all()
    # chain 0 is the single-fit result
    single = to_inference_data(fits["normal"], test, num_samples=S, include_eta=True)
    np.testing.assert_array_equal(idata.posterior["eta"].values[0], single.posterior["eta"].values[0])
    with pytest.raises(ValueError, match="same guide"):
        to_inference_data(fits["normal"], test, chains=[fits["map"]])


# ----------------------------------------------------------------------------------------------
# LOO, WAIC, compare
@pytest.mark.filterwarnings(PARETO, WAIC)
def test_loo_and_waic_finite(counts, fits) -> None:
    _, test = counts
    idata = to_inference_data(fits["normal"], test, num_samples=50)
    loo, waic = az.loo(idata, pointwise=True), az.waic(idata)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(waic.elpd_waic)
    assert loo.loo_i.shape == (test.num_observations,)
    # no correction can exceed the plain lppd by much on held-out data
    lppd = float(log_likelihood(fits["normal"], test, num_samples=50).sum())
    assert loo.elpd_loo <= lppd + 1e-6


@pytest.mark.filterwarnings(PARETO)
def test_compare_ranks_two_models(counts, fits) -> None:
    train, test = counts
    # a model that never learned its intercepts is clearly worse on counts with means 1..3
    poor = _fit(train, "normal", init_intercept=False, num_epochs=1, lr=1e-4)
    table = compare({"poor": poor, "efa": fits["normal"]}, test, num_samples=30)
    assert table.index.tolist() == ["efa", "poor"]
    assert table.loc["efa", "rank"] == 0 and table.loc["poor", "rank"] == 1
    assert table.loc["efa", "elpd_loo"] > table.loc["poor", "elpd_loo"]
    with pytest.raises(ValueError, match="point estimates"):
        compare({"map": fits["map"], "efa": fits["normal"]}, test)


# ----------------------------------------------------------------------------------------------
# PIT
@pytest.mark.parametrize("guide", ["map", "normal"])
def test_pit_in_unit_interval(counts, fits, guide: str) -> None:
    _, test = counts
    u = pit(fits[guide], test, num_samples=30)
    assert u.shape == (test.num_observations,)
    assert (u > 0).all() and (u < 1).all()


def _one_target_per_unit(family: str, num_units: int = 300) -> EFAData:
    # the last observation of each unit is the target, the others context only: replacing the
    # targets by predictive draws leaves every context unchanged
    rng = np.random.default_rng(1)
    rows = []
    for u in range(num_units):
        keys = rng.choice(5, size=4, replace=False)
        for i, k in enumerate(keys):
            x = rng.normal(k, 1.0) if family == "gaussian" else int(rng.poisson(1 + k))
            rows.append((u, int(k), i, x, i < 3))
    df = pd.DataFrame(rows, columns=["unit", "key", "t", "x", "ctx"])
    return EFAData.from_pandas(df, unit="unit", key="key", value="x", order="t", context="ctx")


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_pit_uniform_when_correctly_specified(family: str) -> None:
    data = _one_target_per_unit(family)
    pyro.set_rng_seed(0)
    model = EFA.from_data(data, family=family, **SMALL)
    f = fit(model, data, num_epochs=2, batch_size=32, lr=0.01, progress=False)
    # data drawn from the fitted model's own predictive: PIT values are U(0, 1)
    draw = posterior_predictive(f, data, num_samples=1, seed=1)[0]
    own = dataclasses.replace(data, values=draw)
    u = pit(f, own, num_samples=100, seed=2)
    assert u.shape == (300,)
    assert stats.kstest(u, "uniform").pvalue > 0.01
    # the test has power: a shifted copy is far from uniform
    shifted = dataclasses.replace(data, values=torch.where(data.target, draw * 2 + 2, draw))
    assert stats.kstest(pit(f, shifted, num_samples=100, seed=2), "uniform").pvalue < 1e-4


# ----------------------------------------------------------------------------------------------
# figures and summaries
def test_figures(counts, fits) -> None:
    _, test = counts
    idata = to_inference_data(fits["normal"], test, num_samples=S)
    assert isinstance(plot_ppc(idata), Figure)
    with pytest.raises(ValueError, match="no observation"):
        plot_ppc(idata, family="gamma")
    u = pit(fits["normal"], test, num_samples=20)
    fig = plot_pit(u, groups=idata.constant_data["family"].values)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert isinstance(plot_pit(u), Figure)


def test_plot_attention_panels(counts) -> None:
    train, test = counts
    pyro.set_rng_seed(0)
    model = EFA.from_data(train, family="poisson", dim=4, num_layers=2, num_heads=2, head_dim=2)
    f = fit(model, train, num_epochs=1, progress=False)
    unit = test.unit_labels[int(test.lengths.argmax())]
    fig = plot_attention(f, test, unit)
    assert isinstance(fig, Figure)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 4  # 2 layers x 2 heads
    n = int(test.lengths.max())
    assert images[0].images[0].get_array().shape == (n, n)
    with pytest.raises(ValueError, match="not in the data"):
        plot_attention(f, test, "no such unit")


def test_embedding_summary(counts, fits) -> None:
    train, test = counts
    idata = to_inference_data(fits["normal"], test, num_samples=S)
    table = embedding_summary(idata)
    assert len(table) == 2 * len(train.keys) * SMALL["dim"]
    assert {"mean", "sd"} <= set(table.columns) and "r_hat" not in table.columns


def test_natural_param_draws(counts, fits) -> None:
    _, test = counts
    f = fits["normal"]
    eta = natural_param_draws(f, test, num_samples=S, seed=0)
    assert eta.shape == (S, *test.values.shape, 1)
    idata = to_inference_data(f, test, num_samples=S, seed=0, include_eta=True)
    u, p = _targets(test)
    np.testing.assert_array_equal(idata.posterior["eta"].values[0], eta[:, u, p, 0].double().numpy())
    # given samples (as from MCMC): the posterior draws reproduce the same eta
    samples = {
        k: torch.as_tensor(idata.posterior[k].values[0], dtype=torch.float32) for k in ("alpha", "rho")
    }
    again = natural_param_draws(f, test, samples=samples)
    torch.testing.assert_close(again, eta, equal_nan=True)
    assert natural_param_draws(fits["map"], test).shape[0] == 1


# ----------------------------------------------------------------------------------------------
# attention maps (EFA.attention_maps, EFAEncoder.attention_weights)
@pytest.mark.parametrize(
    "config",
    [
        dict(direction="uni", num_layers=2),
        dict(direction="bi", num_layers=1),
        dict(direction="bi", num_layers=2, context_stream="fixed"),
        dict(direction="bi", num_layers=2),  # per-target only
        dict(direction="uni", num_layers=1, attend_self=False),
    ],
    ids=str,
)
def test_attention_maps(counts, config: dict) -> None:
    train, _ = counts
    pyro.set_rng_seed(0)
    model = EFA.from_data(train, family="poisson", dim=4, num_heads=2, head_dim=2, **config).eval()
    trace = poutine.trace(make_guide(model)).get_trace(train)
    params = {k: v["value"] for k, v in trace.nodes.items() if v["type"] == "sample"}
    with torch.no_grad(), poutine.condition(data=params):
        maps = model.attention_maps(train)
        if model.encoder.one_pass_exact:
            per_target = model.attention_maps(train, mode="per_target")
            for a, b in zip(maps, per_target, strict=True):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        else:
            with pytest.raises(ValueError, match="exact only"):
                model.attention_maps(train, mode="one_pass")
    B, L = train.mask.shape
    assert len(maps) == config["num_layers"]
    idx = torch.arange(L)
    rel = idx[None, :] < idx[:, None] if config["direction"] == "uni" else idx[None, :] != idx[:, None]
    allowed = (rel | (idx[None, :] == idx[:, None])) & train.mask[:, None, :] & train.mask[:, :, None]
    for w in maps:
        assert w.shape == (B, 2, L, L)
        assert torch.all(w[~allowed.unsqueeze(1).expand_as(w)] == 0)
        rows = w.sum(-1)
        nonempty = rows > 0
        torch.testing.assert_close(rows[nonempty], torch.ones_like(rows[nonempty]))
        if config.get("attend_self", True):
            assert torch.equal(nonempty, train.mask[:, None, :].expand_as(nonempty))
        else:
            # the first observation of a unit has nothing to attend to in the causal model
            assert not nonempty[:, :, 0].any() and torch.all(torch.diagonal(w, dim1=-2, dim2=-1) == 0)


# ----------------------------------------------------------------------------------------------
# NUTS cross-check
def _context_counts(num_units: int = 100, num_keys: int = 5, seed: int = 0) -> EFAData:
    # every unit holds each key once in random order; the rate depends on the previous count
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_units):
        prev = 0.0
        for i, k in enumerate(rng.permutation(num_keys)):
            x = int(rng.poisson(np.exp(0.2 + 0.4 * (k % 3) + 0.4 * np.tanh(prev - 1.0))))
            rows.append((u, int(k), i, x))
            prev = x
    df = pd.DataFrame(rows, columns=["unit", "key", "t", "x"])
    return EFAData.from_pandas(df, unit="unit", key="key", value="x", order="t")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_autonormal_natural_params_agree_with_nuts() -> None:
    """The AutoNormal posterior of the natural parameters (rotation invariant) agrees with NUTS
    on a tiny Poisson EFA (5 keys, dim 3, 500 observations) whose network is frozen at its MAP:
    correlation of posterior means >= 0.98, median ratio of posterior sds within a factor 1.5.
    The AutoNormal fit runs through ``pyro_efa.fit(guide="normal")`` with the network frozen."""
    start = time.perf_counter()
    data = _context_counts()
    pyro.set_rng_seed(0)
    model = EFA.from_data(data, family="poisson", dim=3, num_layers=1, num_heads=1, head_dim=3)
    map_fit = fit(model, data, num_epochs=60, batch_size=25, lr=0.02, progress=False)
    for p in model.parameters():  # the network and intercepts stay at the MAP (fit keeps them)
        p.requires_grad_(False)

    # AutoNormal over alpha and rho only, full batch, through pyro_efa.fit
    vi = fit(
        model, data, guide="normal", num_epochs=800, batch_size=len(data), lr=0.01, num_particles=4,
        init_intercept=False, seed=1, progress=False,
    )  # fmt: skip
    eta_vi = natural_param_draws(vi, data, num_samples=500, seed=0)

    # NUTS over alpha and rho, started at the MAP
    init = pyro.infer.autoguide.init_to_value(values=map_fit.median(data))
    for jit in (True, False):
        kernel = pyro.infer.NUTS(model, jit_compile=jit, ignore_jit_warnings=True, init_strategy=init)
        mcmc = pyro.infer.MCMC(kernel, num_samples=150, warmup_steps=150, disable_progbar=True)
        pyro.set_rng_seed(2)
        try:
            mcmc.run(data)
            break
        except RuntimeError:  # tracing the model for jit_compile can fail; run uncompiled
            if not jit:
                raise
    samples = mcmc.get_samples()
    assert set(samples) == {"alpha", "rho"}
    eta_nuts = natural_param_draws(vi, data, samples=samples)

    m = data.target & data.mask
    a, b = eta_vi[..., 0][:, m], eta_nuts[..., 0][:, m]
    corr = float(np.corrcoef(a.mean(0).numpy(), b.mean(0).numpy())[0, 1])
    ratio = float((a.std(0) / b.std(0)).median())
    seconds = time.perf_counter() - start
    print(f"NUTS check (jit_compile={jit}): corr {corr:.4f}, median sd ratio {ratio:.3f}, {seconds:.0f} s")
    assert corr >= 0.98
    assert 1 / 1.5 <= ratio <= 1.5
