"""The one scoring path (:mod:`pyro_efa.scoring`): per-unit latents of a composed model cut to every
batch, Monte Carlo against plug-in, and units the guide knows nothing about."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from helpers import RandomIntercept, intercept_data
from pyro.distributions import constraints
from torch.distributions import biject_to

from pyro_efa import EFA, InputError, evaluate, fit, log_likelihood, predict
from pyro_efa.scoring import Scorer, seeded

SMALL = dict(dim=8, num_layers=1, num_heads=1, head_dim=8)
NUM_USERS = 30  # divisible by neither 7 nor 4


@pytest.fixture(scope="module")
def composed():
    """EFA plus a per-user random intercept, fitted with AutoNormal in batches of 8 users."""
    pyro.set_rng_seed(0)
    data = intercept_data(NUM_USERS)
    model = RandomIntercept(EFA.from_data(data, name="efa", **SMALL))
    f = fit(model, data, guide="normal", num_epochs=3, batch_size=8, lr=0.05, progress=False)
    return f, data


@pytest.fixture(scope="module")
def composed_point(composed):
    """The same fit with every guide scale forced to 1e-6: its draws are (almost) the point."""
    f, data = composed
    import copy

    g = copy.deepcopy(f)
    with torch.no_grad():
        for name, p in g.guide.named_parameters():
            if name.startswith("scales."):
                p.copy_(biject_to(constraints.softplus_positive).inv(torch.full_like(p, 1e-6)))
    return g, data


def _by_hand(fitted, data) -> torch.Tensor:
    """The plug-in log-likelihood from one trace of the model over every unit at once (no
    batches, so nothing to cut): the guide's locs are the posterior medians of AutoNormal."""
    values = {k: v.detach() for k, v in fitted.guide.median(data).items()}
    with torch.no_grad():
        tr = pyro.poutine.trace(pyro.poutine.condition(fitted.model, data=values)).get_trace(data)
    site = tr.nodes["efa.x"]
    return torch.where(data.target & data.mask, site["fn"].base_dist.log_prob(site["value"]), 0.0)


@pytest.mark.parametrize("batch_size", [1, 7, NUM_USERS, 4])
def test_plugin_of_a_composed_model_at_every_batch_size(composed, batch_size: int) -> None:
    f, data = composed
    torch.testing.assert_close(log_likelihood(f, data, batch_size=batch_size), _by_hand(f, data))


@pytest.mark.parametrize("batch_size", [1, 7, NUM_USERS, 4])
def test_monte_carlo_equals_plugin_for_a_point_guide(composed_point, batch_size: int) -> None:
    f, data = composed_point
    plug = log_likelihood(f, data, batch_size=batch_size)
    mc = log_likelihood(f, data, num_samples=3, batch_size=batch_size, seed=0)
    torch.testing.assert_close(mc, plug, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plug, _by_hand(f, data))
    assert evaluate(f, data, batch_size=batch_size)["nll"] == pytest.approx(
        -float(plug.sum()) / data.num_observations, rel=1e-6
    )


def _draws(f, data, batch_size: int, num_samples: int, seed: int) -> torch.Tensor:
    scorer = Scorer(f, data, batch_size)
    with seeded(seed):
        return torch.stack([scorer.score(x).loglik for x in scorer.latent_draws(num_samples)])


def _estimate_and_se(draws: torch.Tensor, boot: int = 200) -> tuple[float, float]:
    """The Monte Carlo total sum_n log mean_s p(x_n | theta_s), and its standard error by
    resampling the draws (the draws are shared by every observation, so they are resampled
    together)."""
    S = draws.size(0)

    def total(d: torch.Tensor) -> float:
        return float((torch.logsumexp(d, 0) - math.log(S)).sum())

    g = torch.Generator().manual_seed(0)
    boots = [total(draws[torch.randint(S, (S,), generator=g)]) for _ in range(boot)]
    return total(draws), float(torch.tensor(boots).std())


def test_monte_carlo_agrees_across_batch_sizes(composed) -> None:
    f, data = composed
    S = 64
    # the same seed gives the same draws whatever the batch size: the guide draws for the data
    # once and the per-unit draws are cut to each batch
    torch.testing.assert_close(
        log_likelihood(f, data, num_samples=8, batch_size=7, seed=3),
        log_likelihood(f, data, num_samples=8, batch_size=NUM_USERS, seed=3),
    )
    # independent draws at two batch sizes: equal within Monte Carlo error
    a, se_a = _estimate_and_se(_draws(f, data, 7, S, seed=1))
    b, se_b = _estimate_and_se(_draws(f, data, NUM_USERS, S, seed=2))
    assert se_a > 0 and se_b > 0  # the guide's scales are real: the draws differ
    assert abs(a - b) < 4 * math.hypot(se_a, se_b), (a, b, se_a, se_b)
    # and the estimate is what log_likelihood returns
    direct = float(log_likelihood(f, data, num_samples=S, batch_size=7, seed=1).sum())
    assert direct == pytest.approx(a, rel=1e-6)


def test_units_the_guide_does_not_know_are_refused(composed) -> None:
    f, _ = composed
    new = intercept_data(5, first=1000)
    with pytest.raises(InputError, match="not among the fit's 30 training units"):
        evaluate(f, new)
    with pytest.raises(InputError, match="amortized guide"):
        log_likelihood(f, new, num_samples=2)


def test_training_units_in_another_order_keep_their_latents(composed) -> None:
    f, data = composed
    order = list(range(len(data)))[::-1][:11]
    shuffled = data.subset(order, reindex=True)  # a data set of its own: unit_index 0..10
    ll = log_likelihood(f, shuffled, batch_size=3)
    torch.testing.assert_close(ll, log_likelihood(f, data)[order][:, : shuffled.max_len])
    u = f.median(shuffled)["u"].squeeze(-1)
    torch.testing.assert_close(u, f.median(data)["u"].squeeze(-1)[order])
    assert list(predict(f, shuffled)["unit"].unique()) == [data.unit_labels[i] for i in order]
