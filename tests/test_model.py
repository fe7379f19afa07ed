"""Tests for :class:`pyro_efa.EFA`: the EFE special case, likelihood terms, target subsets, checks, names."""

import math

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

from pyro_efa import EFA, EFAConfig, EFAData, InputError, Vocabulary
from pyro_efa.datasets import synthetic_ratings

KEYS = ["a", "b", "c", "d"]


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


def make_data(kind, lengths=(1, 3, 7), seed=0):
    """Small data: ``gaussian`` (valued), ``context`` (with context-only rows) or ``items``."""
    rng = np.random.default_rng(seed)
    rows = []
    for u, n in enumerate(lengths):
        for p in range(n):
            row = {"unit": f"u{u}", "pos": p, "key": KEYS[rng.integers(len(KEYS))], "x": rng.normal(1.0, 2.0)}
            if kind == "items":
                row["key"] = f"item{rng.integers(6)}"
            if kind == "context":
                row["ctx"] = bool(p % 3 == 1)
            rows.append(row)
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=seed)
    if kind == "items":
        return EFAData.from_pandas(df, "unit", "key", order="pos")
    return EFAData.from_pandas(
        df, "unit", "key", "x", order="pos", context="ctx" if kind == "context" else None
    )


def trace_values(model, fn, *args, **kwargs):
    with pyro.poutine.trace() as tr:
        out = fn(*args, **kwargs)
    return out, {k: v["value"] for k, v in tr.trace.nodes.items() if v["type"] == "sample"}


def observed_log_prob(model, data, vals):
    """Sum of the observation sites' log-probabilities of one model run (embeddings fixed)."""
    with pyro.poutine.condition(data=vals):
        tr = pyro.poutine.trace(model).get_trace(data)
    sites = set(model.observed_sites)
    return tr, tr.log_prob_sum(site_filter=lambda name, site: name in sites)


# ----------------------------------------------------------------------------------------------
# the EFE special case against its closed form


@pytest.mark.parametrize(
    "kind, direction, lengths",
    [
        pytest.param("gaussian", "uni", (1, 3, 7), id="valued-uni"),
        pytest.param("gaussian", "bi", (1, 3, 7), id="valued-bi"),
        pytest.param("context", "uni", (2, 7), id="valued-context-uni"),
        pytest.param("context", "bi", (1, 5), id="valued-context-bi"),
        pytest.param("items", "uni", (1, 3, 7), id="items-uni"),
        pytest.param("items", "bi", (1, 4, 6), id="items-bi"),
    ],
)
def test_efe_equals_closed_form(f64, kind, direction, lengths):
    data = make_data(kind, lengths)
    model = EFA.efe(data, direction=direction, dim=5)
    with torch.no_grad():
        model.intercept.normal_()  # a non-trivial intercept b
    eta, vals = trace_values(model, model.natural_params, data)
    alpha, rho, b = vals["alpha"], vals["rho"], model.intercept
    empty = 0
    for u, n in enumerate(data.lengths.tolist()):
        for i in range(n):
            if not data.target[u, i]:
                continue
            ctx = [j for j in range(n) if (j < i if direction == "uni" else j != i)]
            if kind == "items":
                z = sum((alpha[int(data.values[u, j])] for j in ctx), torch.zeros(5))
                expected = rho @ z + b
            else:
                k = int(data.key_index[u, i])
                terms = [data.values[u, j] * alpha[data.key_index[u, j]] for j in ctx]
                z = sum(terms, torch.zeros(5)) / max(len(ctx), 1)
                expected = (rho[k] @ z + b[k]).reshape(1)
            if not ctx:  # empty context: the intercept exactly
                assert torch.equal(eta[u, i], b if kind == "items" else b[k].reshape(1))
                empty += 1
            torch.testing.assert_close(eta[u, i], expected, rtol=1e-10, atol=1e-10)
    assert empty >= 1


@pytest.mark.parametrize("standardize", [False, True])
def test_efe_token_on_standardised_values_equals_closed_form(f64, standardize):
    """``value_embedding="key_linear_std"``: the EFE token reads ``(x - value_center[k]) /
    value_scale[k]``; with ``standardize`` the output is ``value_center[k] + value_scale[k] * eta``."""
    data = make_data("gaussian", (1, 3, 6))
    model = EFA.efe(data, direction="bi", dim=4, value_embedding="key_linear_std", standardize=standardize)
    with torch.no_grad():
        model.intercept.normal_()
    eta, vals = trace_values(model, model.natural_params, data)
    alpha, rho, b = vals["alpha"], vals["rho"], model.intercept
    center, scale = model.value_center, model.value_scale
    assert not torch.allclose(center, torch.zeros_like(center))  # the test reads the moments
    for u, n in enumerate(data.lengths.tolist()):
        for i in range(n):
            k = int(data.key_index[u, i])
            ks = [int(data.key_index[u, j]) for j in range(n) if j != i]
            xs = [data.values[u, j] for j in range(n) if j != i]
            terms = [(x - center[kj]) / scale[kj] * alpha[kj] for x, kj in zip(xs, ks, strict=True)]
            z = sum(terms, torch.zeros(4)) / max(len(ks), 1)
            expected = rho[k] @ z + b[k]
            if standardize:
                expected = center[k] + scale[k] * expected
            torch.testing.assert_close(eta[u, i, 0], expected, rtol=1e-10, atol=1e-10)


def test_efe_is_a_configuration_of_efa():
    data = make_data("gaussian")
    model = EFA.efe(data)
    assert isinstance(model, EFA)
    assert model.config.attention == "uniform" and model.config.value_embedding == "key_linear"
    assert len(model.encoder.blocks) == 1 and not model.config.position
    # options can be overridden
    assert EFA.efe(data, direction="bi").direction == "bi"


# ----------------------------------------------------------------------------------------------
# bidirectional one-observation unit


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param(dict(attend_self=False, num_layers=1), id="noself-L1"),
        pytest.param(dict(context_stream="fixed", num_layers=3), id="fixed-L3"),
        pytest.param(dict(encoding="per_target", num_layers=2), id="per-target-L2"),
    ],
)
def test_bi_single_observation_unit_predicts_its_intercept(kwargs):
    """No context, no information: a bidirectional unit with one observation gets the natural
    parameter of its key's intercept, mean = value_center + value_scale * b for a standardised
    Gaussian key, whatever the network; gradients stay finite."""
    data = make_data("gaussian", (1, 1, 4))
    model = EFA.from_data(data, direction="bi", **kwargs)
    with torch.no_grad():
        model.intercept.normal_()  # a non-trivial intercept
    eta, vals = trace_values(model, model.natural_params, data)
    assert torch.isfinite(eta[data.mask]).all()
    for u in (0, 1):  # the two single-observation units
        k = int(data.key_index[u, 0])
        expected = (model.value_center[k] + model.value_scale[k] * model.intercept[k]).detach()
        assert float(eta[u, 0, 0].detach()) == pytest.approx(float(expected), rel=1e-6)
    rows = data.mask[2]  # the unit of four observations does use its context
    assert not torch.allclose(
        eta[2, rows, 0].detach(),
        model.value_center[data.key_index[2, rows]]
        + model.value_scale[data.key_index[2, rows]] * model.intercept[data.key_index[2, rows]],
    )
    alpha = vals["alpha"].detach().requires_grad_(True)
    rho = vals["rho"].detach().requires_grad_(True)
    with pyro.poutine.condition(data={"alpha": alpha, "rho": rho}):
        loss = -pyro.poutine.trace(model).get_trace(data).log_prob_sum()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [alpha.grad, rho.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# initial weights: reset_parameters replays the constructor's draws


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        pytest.param("gaussian", {}, id="valued"),
        pytest.param("gaussian", dict(layer_norm=True, ff_dim=8, num_layers=3), id="ln-ff"),
        pytest.param("gaussian", dict(value_embedding="linear"), id="linear-values"),
        pytest.param("items", dict(direction="bi", context_stream="fixed"), id="items"),
        pytest.param("efe", {}, id="efe"),
    ],
)
def test_reset_parameters_replays_the_constructor(kind, kwargs):
    data = make_data("items" if kind == "items" else "gaussian", (2, 5))
    build = (lambda: EFA.efe(data)) if kind == "efe" else (lambda: EFA.from_data(data, **kwargs))
    pyro.set_rng_seed(7)
    built = build()
    other = build()  # another random state: different weights
    pyro.set_rng_seed(7)
    other.reset_parameters()
    for name, value in built.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name


def test_lookup_value_embedding_refuses_values_it_cannot_look_up():
    df = pd.DataFrame({"unit": [1, 1, 2, 2], "key": ["a", "b", "a", "b"], "x": [0.0, 2.0, 1.0, 2.0]})
    train = EFAData.from_pandas(df, "unit", "key", "x")
    model = EFA.from_data(train, value_embedding="lookup", dim=4)
    assert model.config.num_value_levels == 3
    model.validate(train)
    for bad, why in ((2.7, "2.7"), (3.0, "3.0"), (-1.0, "-1.0")):
        test = EFAData.from_pandas(df.assign(x=[0.0, bad, 1.0, 2.0]), "unit", "key", "x", keys=train.keys)
        with pytest.raises(InputError, match=f"value {why} .*lookup.*integers 0..2"):
            model.validate(test)
    # context-only observations are looked up too (they feed the contexts)
    ctx = EFAData.from_pandas(
        df.assign(x=[0.0, 2.5, 1.0, 2.0], c=[False, True, False, False]), "unit", "key", "x", context="c",
        keys=train.keys,
    )  # fmt: skip
    with pytest.raises(InputError, match="value 2.5"):
        model.validate(ctx)


# ----------------------------------------------------------------------------------------------
# a random subset of targets per step


def test_target_subset_is_unbiased(f64):
    data = make_data("gaussian", (2, 4, 5), seed=4)
    model = EFA.from_data(data, direction="bi", num_layers=2, target_fraction=0.5, dim=8, head_dim=4)
    assert not model.encoder.one_pass_exact  # per-target encoding
    _, vals = trace_values(model, model.natural_params, data)
    model.eval()
    with torch.no_grad():
        tr, full = observed_log_prob(model, data, vals)
    tr.compute_log_prob()
    assert torch.equal(tr.nodes["x"]["log_prob"] != 0, data.target & data.mask)  # eval: all targets
    model.train()
    draws, counts = [], set()
    with torch.no_grad():
        for _ in range(400):
            tr, lp = observed_log_prob(model, data, vals)
            draws.append(float(lp))
            tr.compute_log_prob()
            counts.add(tuple((tr.nodes["x"]["log_prob"] != 0).sum(-1).tolist()))
    assert counts == {(1, 2, 3)}  # ceil(n / 2) targets of each unit
    draws = torch.tensor(draws)
    se = draws.std() / math.sqrt(len(draws))
    assert se > 0
    assert abs(draws.mean() - full.item()) < 4 * se


def test_target_fraction_one_and_eval_score_every_target(f64):
    data = make_data("gaussian", (2, 4), seed=5)
    for model in (
        EFA.from_data(data, direction="bi", num_layers=2, dim=8),
        EFA.from_data(data, direction="bi", num_layers=2, dim=8, target_fraction=0.3).eval(),
    ):
        tr = pyro.poutine.trace(model).get_trace(data)
        tr.compute_log_prob()
        assert torch.equal(tr.nodes["x"]["log_prob"] != 0, data.target & data.mask)
    with pytest.raises(ValueError, match="target_fraction"):
        EFA.from_data(data, target_fraction=0.0)


# ----------------------------------------------------------------------------------------------
# mixed families


def mixed_data(with_category=False, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for day in range(4):
        obs = [
            ("temp", rng.normal(60.0, 8.0)),
            ("rain", float(rng.integers(2))),
            ("count", float(rng.poisson(3))),
        ]
        if with_category:
            obs.append(("sky", float(rng.integers(3))))
        for p in rng.permutation(len(obs))[: 2 + day % 3]:
            rows.append({"day": day, "var": obs[p][0], "value": obs[p][1], "t": float(p)})
    return EFAData.from_pandas(pd.DataFrame(rows), "day", "var", "value", order="t")


def hand_log_prob(model, family, eta, x, key):
    if family == "gaussian":
        s = model.families[[f.name for f in model.families].index("gaussian")].scale_for(key)
        return -0.5 * ((x - eta[0]) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)
    if family == "bernoulli":
        return x * eta[0] - torch.nn.functional.softplus(eta[0])
    if family == "poisson":
        return x * eta[0] - torch.exp(eta[0]) - torch.lgamma(x + 1)
    return torch.log_softmax(eta, -1)[int(x)]


@pytest.mark.parametrize(
    "with_category, family",
    [
        pytest.param(False, {"temp": "gaussian", "rain": "bernoulli", "count": "poisson"}, id="3-families"),
        pytest.param(
            True,
            {"temp": "gaussian", "rain": "bernoulli", "count": "poisson", "sky": "categorical"},
            id="with-categorical",
        ),
    ],
)
def test_mixed_families(f64, with_category, family):
    data = mixed_data(with_category)
    model = EFA.from_data(data, family=family, dim=8, head_dim=4)
    names = sorted(set(family.values()))
    assert sorted(model.observed_sites) == sorted(f"x_{f}" for f in names)
    if with_category:
        cat = next(f for f in model.families if f.name == "categorical")
        assert cat.num_categories == 3  # from the categorical key's values, not the temperatures
    with torch.no_grad():
        eta, vals = trace_values(model, model.natural_params, data)
        tr, total = observed_log_prob(model, data, vals)
        tr.compute_log_prob()
    expected = torch.zeros(())
    for u, i in torch.nonzero(data.target & data.mask).tolist():
        k = int(data.key_index[u, i])
        f = family[data.keys.labels[k]]
        with torch.no_grad():
            lp = hand_log_prob(model, f, eta[u, i], data.values[u, i], data.key_index[u, i])
        # each observation is scored once, at the site of its family
        assert tr.nodes[f"x_{f}"]["log_prob"][u, i] == pytest.approx(float(lp), abs=1e-10)
        for g in names:
            if g != f:
                assert tr.nodes[f"x_{g}"]["log_prob"][u, i] == 0
        expected = expected + lp
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-10)


def test_mixed_families_missing_key():
    data = mixed_data()
    with pytest.raises(ValueError, match="'count'"):
        EFA.from_data(data, family={"temp": "gaussian", "rain": "bernoulli"})


# ----------------------------------------------------------------------------------------------
# validate()


def valued(values, unit_labels=("u0", "u1")):
    df = pd.DataFrame(
        {
            "unit": [unit_labels[i % 2] for i in range(len(values))],
            "key": "a",
            "x": [float(v) for v in values],
        }
    )
    return EFAData.from_pandas(df, "unit", "key", "x")


@pytest.mark.parametrize(
    "family, values, bad",
    [
        pytest.param("poisson", [0, 2, 3, -1], "-1.0", id="poisson-negative"),
        pytest.param("poisson", [0, 2.5, 3, 1], "2.5", id="poisson-non-integer"),
        pytest.param("bernoulli", [0, 1, 1, 2], "2.0", id="bernoulli-2"),
    ],
)
def test_validate_rejects_values_outside_support(family, values, bad):
    data = valued(values, ("good", "bad"))
    model = EFA.from_data(data, family=family, dim=4)
    with pytest.raises(ValueError, match=family) as err:
        model.validate(data)
    assert "'bad'" in str(err.value) and bad in str(err.value)


def test_validate_categorical_out_of_range():
    train = valued([0, 1, 2, 1])
    model = EFA.from_data(train, family="categorical", dim=4)
    model.validate(train)
    test = EFAData.from_pandas(
        pd.DataFrame({"unit": ["u7", "u8"], "key": "a", "x": [1.0, 3.0]}), "unit", "key", "x", keys=train.keys
    )
    with pytest.raises(ValueError, match="categorical") as err:
        model.validate(test)
    assert "'u8'" in str(err.value) and "3.0" in str(err.value)


def test_validate_items_out_of_range():
    train = make_data("items", (3, 4))
    model = EFA.from_data(train, dim=4)
    model.validate(train)
    df = pd.DataFrame({"unit": ["v1", "v1"], "item": ["item0", "zzz"]})
    labels = [*train.items.labels, "zzz"]
    test = EFAData.from_pandas(df, "unit", "item", items=Vocabulary(labels=labels))
    with pytest.raises(ValueError, match=f"'v1'.*{len(train.items)}"):
        model.validate(test)


def test_validate_accepts_context_only_values():
    # context-only rows are not modelled: a count model may take real-valued covariates there
    df = pd.DataFrame(
        {"unit": [1, 1, 2], "key": ["a", "b", "a"], "x": [1.0, -0.5, 2.0], "c": [False, True, False]}
    )
    data = EFAData.from_pandas(df, "unit", "key", "x", context="c")
    EFA.from_data(data, family="poisson", dim=4).validate(data)


# ----------------------------------------------------------------------------------------------
# names


def test_site_and_plate_names():
    data = EFAData.from_pandas(synthetic_ratings(3), "user", "movie", "rating", order="position")
    model = EFA.from_data(data, name="efa", dim=8)
    tr = pyro.poutine.trace(model).get_trace(data)
    samples = {k for k, v in tr.nodes.items() if v["type"] == "sample"}
    assert {"efa.alpha", "efa.rho", "efa.x", "efa.units"} <= samples
    assert model.observed_sites == ["efa.x"]
    assert model.site_name("units") == "efa.units"
    frames = {f.name for f in tr.nodes["efa.x"]["cond_indep_stack"]}
    assert "efa.units" in frames
    unnamed = pyro.poutine.trace(EFA.from_data(data, dim=8)).get_trace(data)
    assert {"alpha", "rho", "x", "units"} <= set(unnamed.nodes)


def test_forward_sample_keeps_context_and_shapes():
    data = EFAData.from_pandas(synthetic_ratings(3), "user", "movie", "rating", order="position")
    model = EFA.from_data(data, dim=8)
    out = model(data, sample=True)
    assert out.shape == data.values.shape
    assert not torch.equal(out[data.mask], data.values[data.mask])
    assert model(data) is data.values


def _baskets(repeat: bool = False) -> EFAData:
    rows = [(0, "a", 0), (0, "b", 1), (0, "c", 2), (1, "c", 0), (1, "d", 1), (2, "e", 0)]
    if repeat:
        rows.append((1, "c", 2))
    df = pd.DataFrame(rows, columns=["basket", "item", "rank"])
    return EFAData.from_pandas(df, unit="basket", key="item", order="rank")


@pytest.mark.parametrize("direction", ["uni", "bi"])
def test_exclude_context_items_masks_exactly_the_context(direction):
    data = _baskets()
    model = EFA.from_data(data, direction=direction, exclude_context_items=True, dim=8, head_dim=8)
    eta = model.natural_params(data)
    items = data.values.long()
    for b in range(len(data)):
        n = int(data.mask[b].sum())
        for i in range(n):
            ctx = range(i) if direction == "uni" else [j for j in range(n) if j != i]
            masked = {int(items[b, j]) for j in ctx}
            for v in range(model.num_items):
                assert torch.isinf(eta[b, i, v]) == (v in masked), (b, i, v)
            assert torch.isfinite(eta[b, i, items[b, i]])  # the observed item keeps its mass


def test_exclude_context_items_rejects_repeats_and_valued_data():
    model = EFA.from_data(_baskets(), exclude_context_items=True)
    with pytest.raises(ValueError, match="item 'c' of unit .* is already in its context"):
        model.validate(_baskets(repeat=True))
    with pytest.raises(ValueError, match="item sequences only"):
        EFAConfig(kind="valued", num_keys=2, exclude_context_items=True)
