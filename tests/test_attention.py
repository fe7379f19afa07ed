"""Tests for :mod:`pyro_efa.attention`: one pass equals per target, no leakage, a brute-force oracle."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

from pyro_efa import EFA, EFAConfig, EFAData
from pyro_efa.attention import AttentionBlock, context_mask

KEYS = ["a", "b", "c", "d"]
FAMILY = {
    "gaussian": "gaussian",
    "poisson": "poisson",
    "bernoulli": "bernoulli",
    "categorical": "categorical",
}


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(old)


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


def make_data(kind, lengths=(1, 3, 7), seed=0):
    """A small table of ``kind`` with units of the given lengths (padding for ragged lengths).

    kinds: gaussian, poisson, bernoulli, categorical (valued, one key column), items (item
    sequences), coords (two numeric key columns), context (gaussian with context-only rows).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u, n in enumerate(lengths):
        for p in range(n):
            row = {"unit": f"u{u}", "pos": p, "key": KEYS[rng.integers(len(KEYS))]}
            if kind in ("gaussian", "coords", "context"):
                row["x"] = rng.normal(2.0, 1.5)
            elif kind == "poisson":
                row["x"] = int(rng.poisson(2.0))
            elif kind == "bernoulli":
                row["x"] = int(rng.integers(2))
            elif kind == "categorical":
                row["x"] = int(rng.integers(3))
            elif kind == "items":
                row["key"] = f"item{rng.integers(6)}"
            if kind == "coords":
                c = rng.integers(4)
                row["lat"], row["lon"] = 30.0 + 2 * c, -100.0 + 3 * (c % 2)
            if kind == "context":
                row["ctx"] = bool(p % 3 == 1)
            rows.append(row)
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # shuffled rows: order by "pos"
    if kind == "items":
        return EFAData.from_pandas(df, "unit", "key", order="pos")
    key = ["lat", "lon"] if kind == "coords" else "key"
    ctx = "ctx" if kind == "context" else None
    return EFAData.from_pandas(df, "unit", key, "x", order="pos", context=ctx)


def make_model(data, kind, **kwargs):
    opts = dict(dim=8, head_dim=4)
    opts.update(kwargs)
    if data.kind == "items":
        return EFA.from_data(data, **opts)
    return EFA.from_data(data, family=FAMILY.get(kind, "gaussian"), **opts)


def traced_natural_params(model, data, **kwargs):
    """``natural_params`` and the sampled embedding values (to condition a second computation)."""
    with pyro.poutine.trace() as tr:
        eta = model.natural_params(data, **kwargs)
    vals = {k: v["value"] for k, v in tr.trace.nodes.items() if v["type"] == "sample"}
    return eta, vals


# ----------------------------------------------------------------------------------------------
# one pass == per target

EXACT_CASES = [
    pytest.param("gaussian", (1, 3, 7), dict(num_layers=1, num_heads=1), id="gauss-uni-L1-H1"),
    pytest.param("gaussian", (1, 3, 7), dict(num_layers=3, num_heads=2), id="gauss-uni-L3-H2"),
    pytest.param("poisson", (7, 1, 2, 7), dict(num_layers=2, num_heads=2), id="poisson-uni-L2-H2"),
    pytest.param("bernoulli", (1, 3, 7), dict(num_layers=2, num_heads=1), id="bernoulli-uni-L2-H1"),
    pytest.param("categorical", (1, 3, 7), dict(num_layers=3, num_heads=1), id="cat-uni-L3-H1"),
    pytest.param("items", (1, 3, 7), dict(num_layers=2, num_heads=2), id="items-uni-L2-H2"),
    pytest.param("coords", (2, 5), dict(num_layers=2), id="coords-mlp-uni-L2"),
    pytest.param("context", (3, 7), dict(num_layers=3), id="context-rows-uni-L3"),
    pytest.param("gaussian", (1, 3, 7), dict(direction="bi", num_layers=1, num_heads=2), id="gauss-bi-L1-H2"),
    pytest.param("bernoulli", (4, 4), dict(direction="bi", num_layers=1, num_heads=1), id="bern-bi-L1-nopad"),
    pytest.param("categorical", (2, 6), dict(direction="bi", num_layers=1), id="cat-bi-L1"),
    pytest.param("items", (1, 3, 7), dict(direction="bi", num_layers=1, num_heads=1), id="items-bi-L1-H1"),
    pytest.param(
        "gaussian",
        (1, 3, 7),
        dict(direction="bi", num_layers=3, context_stream="fixed"),
        id="gauss-bi-fixed-L3",
    ),
    pytest.param(
        "items", (3, 7), dict(direction="bi", num_layers=3, context_stream="fixed"), id="items-bi-fixed-L3"
    ),
    pytest.param("poisson", (1, 3, 7), dict(num_layers=2, context_stream="fixed"), id="poisson-uni-fixed-L2"),
    pytest.param(
        "gaussian", (1, 3, 7), dict(num_layers=2, layer_norm=True, ff_dim=16), id="gauss-uni-L2-ln-ff"
    ),
    pytest.param(
        "context",
        (2, 7),
        dict(direction="bi", num_layers=3, context_stream="fixed", layer_norm=True, ff_dim=16),
        id="context-bi-fixed-L3-ln-ff",
    ),
    pytest.param("gaussian", (3, 5), dict(num_layers=2, attend_self=False), id="gauss-uni-L2-noself"),
]


@pytest.mark.parametrize("kind, lengths, kwargs", EXACT_CASES)
def test_one_pass_equals_per_target(dtype, kind, lengths, kwargs):
    data = make_data(kind, lengths)
    model = make_model(data, kind, **kwargs)
    assert model.encoder.one_pass_exact
    one, vals = traced_natural_params(model, data, mode="one_pass")
    with pyro.poutine.condition(data=vals):
        per = model.natural_params(data, mode="per_target")
        auto = model.natural_params(data)
    assert one.dtype == per.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    real = data.mask & data.target  # the modelled observations (per-target skips context rows)
    assert torch.isfinite(one[real]).all()
    torch.testing.assert_close(per[real], one[real], rtol=tol, atol=tol)
    assert torch.equal(auto, one)  # auto picks the one-pass computation when it is exact
    # the states are not trivial: different targets get different natural parameters
    assert one[real].std() > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(num_layers=2), id="shared-L2"),
        pytest.param(dict(num_layers=3, layer_norm=True, ff_dim=16, num_heads=2), id="shared-L3-ln-ff"),
        pytest.param(dict(num_layers=3, context_stream="fixed"), id="fixed-L3"),
        pytest.param(dict(num_layers=2, attend_self=False), id="shared-L2-noself"),
    ],
)
def test_per_target_equals_brute_force(f64, kwargs):
    # the paper's bidirectional encoding, one unit and target at a time: the unit's real tokens
    # with token i replaced by its query token, every block applied to the whole sequence, row i
    data = make_data("gaussian", (1, 3, 6))
    model = make_model(data, "gaussian", direction="bi", **kwargs).eval()
    enc = model.encoder
    B, n = data.mask.shape
    content, query = torch.randn(B, n, 8), torch.randn(B, n, 8)
    z = enc(content, query, data.mask, mode="per_target")
    for b in range(B):
        real = data.mask[b].nonzero().squeeze(-1)
        m = real.numel()
        for i in range(m):
            tokens = content[b, real].clone()
            tokens[i] = query[b, real[i]]
            allowed = torch.ones(m, m, dtype=torch.bool)
            allowed[i, i] = enc.attend_self
            x = tokens.unsqueeze(0)
            for block in enc.blocks:
                y = block(x, x, allowed.unsqueeze(0))
                if enc.context_stream == "fixed":  # only the query token is updated
                    y = torch.where((torch.arange(m) == i)[None, :, None], y, tokens)
                x = y
            expected = x[0, i] if m > 1 else torch.zeros(8)  # no context: z = 0 (the intercept)
            torch.testing.assert_close(z[b, real[i]], expected, rtol=1e-10, atol=1e-10)


def test_per_target_select_computes_only_selected(f64):
    data = make_data("gaussian", (3, 7))
    model = make_model(data, "gaussian", direction="bi", num_layers=2)
    full, vals = traced_natural_params(model, data, mode="per_target")
    select = torch.zeros_like(data.mask)
    select[1, [0, 4, 6]] = True
    select[0, 2] = True
    with pyro.poutine.condition(data=vals):
        part = model.natural_params(data, mode="per_target", select=select)
    torch.testing.assert_close(part[select], full[select], rtol=1e-12, atol=1e-12)
    k = data.key_index[~select]
    b = model._out_center[k] + model._out_scale[k] * model.intercept[k]  # (standardised Gaussian)
    torch.testing.assert_close(part[~select][:, 0], b)  # z = 0 there: eta is the intercept


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(direction="bi", num_layers=2), id="bi-shared-L2"),
        pytest.param(dict(direction="bi", num_layers=3, layer_norm=True), id="bi-shared-L3-ln"),
    ],
)
def test_one_pass_raises_when_not_exact(kwargs):
    data = make_data("gaussian", (2, 4))
    model = make_model(data, "gaussian", **kwargs)
    assert not model.encoder.one_pass_exact
    with pytest.raises(ValueError, match="exact only"):
        model.natural_params(data, mode="one_pass")
    # auto falls back to the per-target computation
    auto, vals = traced_natural_params(model, data)
    with pyro.poutine.condition(data=vals):
        per = model.natural_params(data, mode="per_target")
    assert torch.equal(auto, per)
    with pytest.raises(ValueError, match="exact only"):
        EFA.from_data(data, direction="bi", num_layers=2, encoding="one_pass", dim=8).natural_params(data)


def test_bad_mode_and_direction():
    data = make_data("gaussian", (2, 3))
    model = make_model(data, "gaussian", num_layers=1)
    with pytest.raises(ValueError, match="mode"):
        model.natural_params(data, mode="fast")
    with pytest.raises(ValueError, match="direction"):
        context_mask(data.mask, "left")
    with pytest.raises(ValueError, match="direction"):
        EFA.from_data(data, direction="sideways")


# ----------------------------------------------------------------------------------------------
# no leakage

LEAK_CASES = [
    pytest.param("gaussian", dict(num_layers=1), "one_pass", id="gauss-uni-L1-one"),
    pytest.param("gaussian", dict(num_layers=1), "per_target", id="gauss-uni-L1-per"),
    pytest.param("gaussian", dict(num_layers=3), "one_pass", id="gauss-uni-L3-one"),
    pytest.param("gaussian", dict(num_layers=3), "per_target", id="gauss-uni-L3-per"),
    pytest.param(
        "poisson", dict(num_layers=2, layer_norm=True, ff_dim=16), "one_pass", id="poisson-uni-L2-ln"
    ),
    pytest.param("bernoulli", dict(direction="bi", num_layers=1), "one_pass", id="bern-bi-L1-one"),
    pytest.param("categorical", dict(direction="bi", num_layers=2), "per_target", id="cat-bi-L2-per"),
    pytest.param("gaussian", dict(direction="bi", num_layers=3), "per_target", id="gauss-bi-L3-per"),
    pytest.param(
        "gaussian", dict(direction="bi", num_layers=3, context_stream="fixed"), "one_pass", id="bi-fix-L3"
    ),
    pytest.param("context", dict(num_layers=2), "one_pass", id="context-uni-L2-one"),
    pytest.param("coords", dict(direction="bi", num_layers=2), "per_target", id="coords-bi-L2-per"),
]


def in_context(i, n, direction):
    return [j for j in range(n) if (j < i if direction == "uni" else j != i)]


@pytest.mark.parametrize("kind, kwargs, mode", LEAK_CASES)
def test_no_leakage_gradient(f64, kind, kwargs, mode):
    data = make_data(kind, (1, 4, 6), seed=1)
    model = make_model(data, kind, **kwargs)
    direction = model.direction
    v = data.values.clone().requires_grad_(True)
    batch = dataclasses.replace(data, values=v)
    eta = model.natural_params(batch, mode=mode)
    w = torch.randn(eta.size(-1))  # a random projection of vector natural parameters
    lengths = data.lengths.tolist()
    checked = 0
    for u, i in torch.nonzero(data.target & data.mask).tolist():
        (g,) = torch.autograd.grad((eta[u, i] * w).sum(), v, retain_graph=True)
        assert g[u, i] == 0.0, f"eta_{i} depends on its own value x_{i}"
        assert (g[~data.mask] == 0).all(), "padding leaks into a real observation"
        others = torch.arange(len(data)) != u
        assert (g[others] == 0).all(), "another unit leaks into this one"
        if direction == "uni":
            assert (g[u, i + 1 :] == 0).all(), "a later value leaks into a causal conditional"
        ctx = in_context(i, lengths[u], direction)
        if ctx:  # the test can fail: the context does reach eta_i
            assert (g[u, ctx] != 0).all(), f"eta_{i} ignores part of its context"
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize(
    "kwargs, mode",
    [
        pytest.param(dict(num_layers=1), "one_pass", id="uni-L1-one"),
        pytest.param(dict(num_layers=3), "one_pass", id="uni-L3-one"),
        pytest.param(dict(num_layers=2), "per_target", id="uni-L2-per"),
        pytest.param(dict(direction="bi", num_layers=1), "one_pass", id="bi-L1-one"),
        pytest.param(dict(direction="bi", num_layers=3), "per_target", id="bi-L3-per"),
        pytest.param(
            dict(direction="bi", num_layers=2, context_stream="fixed"), "one_pass", id="bi-fixed-L2"
        ),
    ],
)
def test_no_leakage_items_perturbation(f64, kwargs, mode):
    data = make_data("items", (2, 5, 6), seed=2)
    model = make_model(data, "items", **kwargs)
    eta, vals = traced_natural_params(model, data, mode=mode)
    num_items = len(data.items)
    changed_somewhere = False
    with pyro.poutine.condition(data=vals):
        for u, i in torch.nonzero(data.mask).tolist():
            n = int(data.lengths[u])
            hidden = [i] + (list(range(i + 1, n)) if model.direction == "uni" else [])
            x = data.values.clone()
            x[u, hidden] = (x[u, hidden] + 1 + torch.arange(len(hidden))) % num_items
            eta2 = model.natural_params(dataclasses.replace(data, values=x), mode=mode)
            assert torch.equal(eta2[u, i], eta[u, i]), f"eta_{i} of unit {u} changed with hidden items"
            # changing the context does change eta_i
            ctx = in_context(i, n, model.direction)
            if ctx:
                x = data.values.clone()
                x[u, ctx] = (x[u, ctx] + 1) % num_items
                eta3 = model.natural_params(dataclasses.replace(data, values=x), mode=mode)
                assert not torch.allclose(eta3[u, i], eta[u, i])
                changed_somewhere = True
    assert changed_somewhere


# ----------------------------------------------------------------------------------------------
# one attention block against a brute-force oracle


def oracle_block(block, x, memory, allowed):
    """Explicit loops: per head a masked softmax over allowed memory rows; 0 for empty rows."""
    B, n, d = x.shape
    H, dh = block.num_heads, block.head_dim
    out = torch.zeros(B, n, H * dh, dtype=x.dtype)
    for b in range(B):
        for i in range(n):
            for h in range(H):
                cols = slice(h * dh, (h + 1) * dh)
                js = [j for j in range(memory.size(1)) if allowed[b, i, j]]
                if not js:
                    continue
                if block.uniform:
                    scores = torch.zeros(len(js), dtype=x.dtype)
                else:
                    q = block.w_q.weight[cols] @ x[b, i]
                    scores = torch.stack(
                        [q @ (block.w_k.weight[cols] @ memory[b, j]) / math.sqrt(dh) for j in js]
                    )
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                if block.pool == "sum":
                    w = w * len(js)
                vs = [(block.w_v.weight[cols] @ memory[b, j]) if block.project else memory[b, j] for j in js]
                out[b, i, cols] = sum(wj * vj for wj, vj in zip(w, vs, strict=True))
    a = out @ block.w_o.weight.T if block.project else out
    y = x + a if block.residual else a
    if block.norm1 is not None:
        y = layer_norm(y, block.norm1)
    if block.ff is not None:
        y = y + block.ff[2](torch.nn.functional.gelu(block.ff[0](y)))
        if block.norm2 is not None:
            y = layer_norm(y, block.norm2)
    return a, y


def layer_norm(y, norm):
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(num_heads=2, head_dim=3), id="2heads"),
        pytest.param(dict(num_heads=2, head_dim=3, layer_norm=True, ff_dim=5), id="2heads-ln-ff"),
        pytest.param(dict(num_heads=2, head_dim=3, residual=False, pool="sum"), id="2heads-sum-nores"),
        pytest.param(
            dict(num_heads=1, attention="uniform", project=False, residual=False), id="uniform-noproj"
        ),
    ],
)
def test_attention_block_matches_oracle(f64, kwargs):
    torch.manual_seed(3)
    block = AttentionBlock(EFAConfig(dim=6, **kwargs))
    if block.norm1 is not None:  # non-trivial LayerNorm affine parameters
        with torch.no_grad():
            for p in block.parameters():
                if p.dim() == 1:
                    p.normal_()
    x, memory = torch.randn(2, 4, 6), torch.randn(2, 5, 6)
    allowed = torch.rand(2, 4, 5) < 0.6
    allowed[0, 1] = False  # a query with nothing allowed
    allowed[1, 2] = True
    a_ref, y_ref = oracle_block(block, x, memory, allowed)
    a = block.attend(x, memory, allowed)
    torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-10)
    assert (a[0, 1] == 0).all()  # empty row: zero attention output, not NaN
    torch.testing.assert_close(block(x, memory, allowed), y_ref, rtol=1e-10, atol=1e-10)
    # attention weights: rows sum to 1 where something is allowed, 0 elsewhere
    w = block.weights(x, memory, allowed)
    assert w.shape == (2, block.num_heads, 4, 5)
    assert (w[~allowed.unsqueeze(1).expand_as(w)] == 0).all()
    row_sums = w.sum(-1)
    expected = allowed.any(-1).unsqueeze(1).expand_as(row_sums).to(w.dtype)
    torch.testing.assert_close(row_sums, expected)


def test_attention_block_empty_row_gradient_is_finite(f64):
    block = AttentionBlock(EFAConfig(dim=4, num_heads=2, head_dim=2))
    x = torch.randn(1, 3, 4, requires_grad=True)
    allowed = torch.tensor([[[False, False, False], [True, False, False], [True, True, False]]])
    block(x, x, allowed).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_attention_options_are_checked_by_the_config():
    with pytest.raises(ValueError, match="pool"):
        EFAConfig(pool="max")
    with pytest.raises(ValueError, match="num_heads"):
        EFAConfig(num_heads=2, project=False)


def test_context_mask():
    mask = torch.tensor([[True, True, True, False]])
    uni = context_mask(mask, "uni")[0]
    bi = context_mask(mask, "bi")[0]
    for i in range(4):
        for j in range(4):
            assert bool(uni[i, j]) == (j < i and j < 3)
            assert bool(bi[i, j]) == (j != i and j < 3)
