"""Fitting, evaluation, saving and composition."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from helpers import RandomIntercept, loglik_by_hand

import pyro_efa
from pyro_efa import EFA, EFAData, evaluate, fit, load, log_likelihood, posterior_predictive, save
from pyro_efa.datasets import synthetic_ratings
from pyro_efa.generate import sample_units
from pyro_efa.guides import make_guide

SMALL = dict(dim=8, num_layers=1, num_heads=1, head_dim=8)


@pytest.fixture
def ratings() -> EFAData:
    df = synthetic_ratings(120, seed=1)
    return EFAData.from_pandas(df, unit="user", key="movie", value="rating", order="position")


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("guide", ["map", "normal", "lowrank"])
def test_fit_each_guide(counts: EFAData, guide: str) -> None:
    train, val = counts.split((0.7, 0.3), seed=0)
    model = EFA.from_data(train, family="poisson", **SMALL)
    f = fit(model, train, guide=guide, val_data=val, num_epochs=3, batch_size=16, progress=False)
    assert len(f.losses) == 3 and all(np.isfinite(f.losses))
    assert len(f.val_nll) == 3
    # the restored state is the best epoch's
    assert f.val_nll[f.best_epoch - 1] == min(f.val_nll)
    m = evaluate(f, val)
    assert m["nll"] == pytest.approx(f.val_nll[f.best_epoch - 1], rel=1e-5)
    assert m["num_observations"] == val.num_observations
    assert np.isfinite(m["mse"])


def test_fit_is_deterministic(counts: EFAData) -> None:
    runs = []
    for _ in range(2):
        pyro.set_rng_seed(7)  # the network's initial weights
        model = EFA.from_data(counts, family="poisson", **SMALL)
        f = fit(model, counts, num_epochs=2, batch_size=16, progress=False, seed=3)
        runs.append((_params(f.model), _params(f.guide)))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_lr_decay_changes_the_trajectory_only_after_a_plateau(counts: EFAData) -> None:
    train, val = counts.split((0.7, 0.3), seed=0)

    def run(**kwargs: float) -> pyro_efa.EFAFit:
        pyro.set_rng_seed(7)
        model = EFA.from_data(train, family="poisson", **SMALL)
        return fit(
            model, train, val_data=val, num_epochs=12, batch_size=16, lr=0.05, patience=50, seed=3,
            progress=False, **kwargs,
        )  # fmt: skip

    constant, decayed = run(), run(lr_decay=0.5, lr_patience=0)
    # the first epoch whose validation NLL does not improve on the best so far
    first = next(e for e in range(1, 12) if constant.val_nll[e] >= min(constant.val_nll[:e]) - 1e-6)
    assert decayed.losses[: first + 1] == constant.losses[: first + 1]
    assert decayed.val_nll[: first + 1] == constant.val_nll[: first + 1]
    assert decayed.losses[first + 1] != constant.losses[first + 1]  # the next epoch runs at lr / 2
    with pytest.raises(ValueError, match="lr_decay"):
        run(lr_decay=1.5)
    with pytest.raises(ValueError, match="val_data"):
        fit(EFA.from_data(train, family="poisson", **SMALL), train, lr_decay=0.5, progress=False)


def test_two_fits_do_not_share_parameters(counts: EFAData) -> None:
    # the global param store trap: a second fit must not change the first one
    f1 = fit(EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False)
    before = evaluate(f1, counts)["nll"]
    fit(EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=2, progress=False, seed=1)
    assert evaluate(f1, counts)["nll"] == before


def test_the_seed_alone_makes_a_fit_reproducible(counts: EFAData) -> None:
    """Two models built from different random states fit to the same numbers with one seed:
    fit draws the network's initial weights from it."""
    fits = []
    for state in (11, 12):
        pyro.set_rng_seed(state)
        model = EFA.from_data(counts, family="poisson", dropout=0.1, **SMALL)
        fits.append(fit(model, counts, guide="normal", num_epochs=2, batch_size=16, seed=5, progress=False))
    a, b = fits
    assert a.losses == b.losses
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    other = fit(b.model, counts, guide="normal", num_epochs=2, batch_size=16, seed=6, progress=False)
    assert other.losses != a.losses  # and another seed moves it
    # a warm start keeps the weights the model holds
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    warm = fit(other.model, counts, num_epochs=1, seed=5, init_network=False, lr=1e-12, progress=False)
    moved = [
        k
        for k, v in warm.model.state_dict().items()
        if "intercept" not in k and not torch.allclose(v, before[k])
    ]
    assert not moved, moved


def test_pointwise_loglik_sums_to_trace(counts: EFAData) -> None:
    f = fit(EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False)
    ll = log_likelihood(f, counts)
    assert ll.shape == counts.values.shape
    assert torch.all(ll[~(counts.target & counts.mask)] == 0)
    # the same total from a trace of the model at the MAP (no subsampling: scale 1)
    params = f.median(counts)
    with torch.no_grad():
        tr = pyro.poutine.trace(pyro.poutine.condition(f.model, data=params)).get_trace(counts)
    total = sum(tr.nodes[s]["fn"].log_prob(tr.nodes[s]["value"]).sum() for s in f.efa.observed_sites)
    assert float(ll.sum()) == pytest.approx(float(total), rel=1e-5)
    # Poisson metric without the log y! term
    m = evaluate(f, counts)
    lgam = torch.lgamma(counts.values + 1)[counts.target & counts.mask].mean()
    assert m["nll_no_base"] == pytest.approx(m["nll"] - float(lgam), rel=1e-5)


def test_mc_predictive_density(counts: EFAData) -> None:
    f = fit(
        EFA.from_data(counts, family="poisson", **SMALL), counts, guide="normal", num_epochs=2, progress=False
    )
    a = log_likelihood(f, counts, num_samples=8, seed=0)
    b = log_likelihood(f, counts, num_samples=8, seed=0)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    # an independent computation: 8 guide draws by hand, each plugged into a trace of the model
    expected = torch.logsumexp(loglik_by_hand(f, counts, 8, seed=0), 0) - math.log(8)
    torch.testing.assert_close(a, expected)


def test_posterior_predictive_shapes(counts: EFAData) -> None:
    f = fit(
        EFA.from_data(counts, family="poisson", **SMALL), counts, guide="normal", num_epochs=1, progress=False
    )
    draws = posterior_predictive(f, counts, num_samples=5)
    assert draws.shape == (5, *counts.values.shape)
    targets = counts.target & counts.mask
    assert torch.all(draws[:, ~targets] == counts.values[~targets])
    assert torch.all(draws[:, targets] >= 0) and torch.all(draws == draws.round())


@pytest.mark.parametrize("guide", ["map", "normal"])
def test_save_load_round_trip(counts: EFAData, tmp_path, guide: str) -> None:
    f = fit(
        EFA.from_data(counts, family="poisson", **SMALL), counts, guide=guide, num_epochs=2, progress=False
    )
    save(f, tmp_path / "fit")
    g = load(tmp_path / "fit")
    assert evaluate(g, counts) == evaluate(f, counts)
    assert g.losses == f.losses and g.guide_name == guide
    for k, v in _params(f.model).items():
        assert torch.equal(v, _params(g.model)[k])


def test_load_rejects_damaged_files(counts: EFAData, tmp_path) -> None:
    f = fit(EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False)
    save(f, tmp_path / "fit")
    params = tmp_path / "fit" / "params.pt"
    params.write_bytes(params.read_bytes()[:100])
    with pytest.raises(ValueError, match="params.pt"):
        load(tmp_path / "fit")
    with pytest.raises(ValueError, match="readable"):
        load(tmp_path / "nothing-here")


def test_composition_random_intercept() -> None:
    rng = np.random.default_rng(0)
    num_users, n = 150, 8
    offset = rng.normal(0, 2, size=num_users)
    df = pd.DataFrame(
        {
            "user": np.repeat(np.arange(num_users), n),
            "key": np.tile(np.arange(n), num_users),
            "x": (np.repeat(offset, n) + rng.normal(0, 0.5, size=num_users * n)),
        }
    )
    data = EFAData.from_pandas(df, unit="user", key="key", value="x", order="key")
    # one shared scale: the test is about the random intercept, not the per-key scales
    efa = EFA.from_data(
        data, family="gaussian", family_options={"gaussian": {"per_key": False}}, name="efa", **SMALL
    )
    model = RandomIntercept(efa)
    f = fit(model, data, guide="normal", num_epochs=40, batch_size=50, lr=0.03, progress=False)
    assert {"efa.alpha", "efa.rho", "u"} <= set(f.median(data))
    u = f.median(data)["u"].squeeze()
    assert u.shape == (num_users,)
    # the per-unit effect is recovered (up to what the context already explains)
    assert np.corrcoef(u.numpy(), offset)[0, 1] > 0.5
    assert evaluate(f, data)["mse"] < 0.6


def test_make_guide_rejects_unknown(counts: EFAData) -> None:
    with pytest.raises(ValueError, match="guide"):
        make_guide(EFA.from_data(counts, family="poisson"), "laplace")


@pytest.mark.slow
def test_synthetic_fit_reaches_floor() -> None:
    """Held-out MSE < 1.10 (Bayes floor 1.0) in both directions; EFE is clearly worse."""
    df = synthetic_ratings(10_000, seed=42)
    data = EFAData.from_pandas(df, unit="user", key="movie", value="rating", order="position")
    train_all = data.subset(range(7500), reindex=True)
    test = data.subset(range(7500, 10_000), reindex=True)
    train, val = train_all.split((0.75, 0.25), seed=0)
    for direction in ("uni", "bi"):
        f = fit(
            EFA.from_data(train, direction=direction),
            train,
            val_data=val,
            lr=3e-3,
            num_epochs=40,
            progress=False,
        )
        mse = evaluate(f, test)["mse"]
        assert mse < 1.10, (direction, mse)
        e = fit(
            EFA.efe(train, direction=direction), train, val_data=val, lr=3e-3, num_epochs=40, progress=False
        )
        assert evaluate(e, test)["mse"] > mse + 0.3
        # generated units follow the rules: movie 2 after movie 1 has mean 1, before it 5
        for keys, mu2 in (([1, 2, 3, 4, 5], 1.0), ([2, 1, 3, 4, 5], 5.0)):
            s = sample_units(f, 400, keys=keys, num_sweeps=3, seed=0)
            x = s.loc[s.key == 2, "value"].to_numpy()
            # tolerance: 4 standard errors of the mean plus a 0.25 allowance for model error
            assert abs(x.mean() - mu2) < 4 * x.std() / np.sqrt(len(x)) + 0.25, (direction, keys, x.mean())


def test_unit_with_only_context_observations_contributes_nothing() -> None:
    """Documented behaviour: a unit whose observations are all context-only is kept (it has
    nothing to score); its log-likelihood terms are 0 and it is not counted in metrics."""
    df = pd.DataFrame(
        {
            "u": [1, 1, 1, 2, 2, 3, 3],
            "k": [1, 2, 3, 1, 2, 2, 3],
            "x": [1.0, 2.0, 0.5, 1.5, 2.5, 0.0, 1.0],
            "ctx": [False, False, False, True, True, False, True],
        }
    )
    data = EFAData.from_pandas(df, unit="u", key="k", value="x", context="ctx")
    f = fit(EFA.from_data(data, **SMALL), data, num_epochs=1, progress=False)
    ll = log_likelihood(f, data)
    assert torch.all(ll[1] == 0) and torch.all(ll[0, :3] != 0)
    assert evaluate(f, data)["num_observations"] == 4


@pytest.mark.parametrize(
    "direction, context_stream, encoding, target_fraction",
    [
        ("uni", "shared", "one_pass", 1.0),
        ("uni", "shared", "per_target", 1.0),
        ("uni", "shared", "per_target", 0.5),
        ("bi", "fixed", "one_pass", 1.0),
        ("bi", "fixed", "per_target", 0.5),
        ("bi", "shared", "per_target", 1.0),
        ("bi", "shared", "per_target", 0.5),
    ],
)
def test_units_without_targets_in_every_encoding_mode(
    direction: str, context_stream: str, encoding: str, target_fraction: float
) -> None:
    """Units holding only context rows (a day whose readings are all missing while its lag rows
    are present) train, score and subsample targets without error, and contribute nothing."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(12):
        for k in range(4):
            context = u % 3 == 0 or k == 0  # units 0, 3, 6, 9: context rows only
            rows.append({"u": u, "k": k, "x": rng.normal(), "ctx": context})
    data = EFAData.from_pandas(pd.DataFrame(rows), unit="u", key="k", value="x", context="ctx")
    config = {**SMALL, "num_layers": 2, "direction": direction, "context_stream": context_stream}
    model = EFA.from_data(data, encoding=encoding, target_fraction=target_fraction, **config)
    f = fit(model, data, num_epochs=3, batch_size=4, progress=False)
    assert all(math.isfinite(x) for x in f.losses)
    ll = log_likelihood(f, data)
    empty = [i for i, label in enumerate(data.unit_labels) if label % 3 == 0]
    assert torch.all(ll[empty] == 0) and torch.isfinite(ll).all()
    assert evaluate(f, data)["num_observations"] == 8 * 3
    assert torch.isfinite(posterior_predictive(f, data, num_samples=2)).all()


def test_ancestral_first_draw_follows_the_intercept() -> None:
    """Uni EFE: the first item of a new unit has an empty context, so its distribution is
    softmax(b) exactly; draws match it within 4 standard errors per item."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"basket": np.repeat(np.arange(40), 3), "item": rng.choice(["a", "b", "c", "d"], size=120)}
    )
    data = EFAData.from_pandas(df, unit="basket", key="item")
    f = fit(EFA.efe(data), data, num_epochs=2, progress=False)
    draws = sample_units(f, 4000, length=2, seed=1)
    first = draws[draws.position == 0].value.value_counts(normalize=True)
    p = torch.softmax(f.efa.intercept.detach(), -1).numpy()
    for i, label in enumerate(data.items.labels):
        se = np.sqrt(p[i] * (1 - p[i]) / 4000)
        assert abs(first.get(label, 0.0) - p[i]) < 4 * se, label


def test_plugin_evaluation_of_per_unit_latents_across_batches() -> None:
    """A larger model's per-unit latent sites are cut to each evaluation batch's units."""
    rng = np.random.default_rng(1)
    num_users, n = 30, 4
    df = pd.DataFrame(
        {
            "user": np.repeat(np.arange(num_users), n),
            "key": np.tile(np.arange(n), num_users),
            "x": np.repeat(rng.normal(0, 2, size=num_users), n) + rng.normal(0, 0.5, size=num_users * n),
        }
    )
    data = EFAData.from_pandas(df, unit="user", key="key", value="x", order="key")
    model = RandomIntercept(EFA.from_data(data, name="efa", **SMALL))
    f = fit(model, data, guide="normal", num_epochs=2, batch_size=8, progress=False, eval_batch_size=8)
    small = log_likelihood(f, data, batch_size=7)
    whole = log_likelihood(f, data, batch_size=num_users)
    torch.testing.assert_close(small, whole)
    a, b = evaluate(f, data, batch_size=7), evaluate(f, data, batch_size=64)
    for name in ("per_site", "per_key"):
        pd.testing.assert_frame_equal(pd.DataFrame(a.pop(name)), pd.DataFrame(b.pop(name)), rtol=1e-6)
    assert a == pytest.approx(b)
