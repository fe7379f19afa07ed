"""Guides: by name (saved and loaded), autoguide objects, a guide list, a hand-written guide and an
amortized guide of per-unit latents (:mod:`pyro_efa.guides`, ``fit(guide=...)``)."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import AmortizedIntercept, RandomIntercept, intercept_data
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuideList,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroModule

from pyro_efa import EFA, EFAData, evaluate, fit, load, log_likelihood, make_guide, save
from pyro_efa.guides import GUIDES, guide_name, init_to_small, is_point_estimate
from pyro_efa.scoring import amortized

TINY = dict(dim=2, num_layers=1, num_heads=1, head_dim=2)


@pytest.fixture
def tiny(counts: EFAData) -> EFAData:
    return counts.subset(range(20), reindex=True)


@pytest.mark.parametrize("name", list(GUIDES))
def test_every_named_guide_fits_and_round_trips(tiny: EFAData, tmp_path: Path, name: str) -> None:
    model = EFA.from_data(tiny, family="poisson", **TINY)
    options = {"iaf": {"hidden_dim": [64], "num_transforms": 1}}.get(name, {})
    guide = make_guide(model, name, **options)
    f = fit(model, tiny, guide=guide, num_epochs=2, batch_size=10, progress=False)
    assert f.guide_name == name and is_point_estimate(f.guide) == (name == "map")
    metrics = evaluate(f, tiny)
    assert math.isfinite(metrics["nll"])
    save(f, tmp_path / name)
    g = load(tmp_path / name)
    assert g.guide_name == name
    assert evaluate(g, tiny) == metrics  # the plug-in values come back exactly


def test_unknown_guide_name_and_options(tiny: EFAData) -> None:
    model = EFA.from_data(tiny, family="poisson", **TINY)
    with pytest.raises(ValueError, match="unknown guide 'laplace'"):
        make_guide(model, "laplace")
    with pytest.raises(ValueError, match="takes the option"):
        make_guide(model, "map", rank=3)


def test_autoguide_objects_fit_and_refuse_to_be_saved(tiny: EFAData, tmp_path: Path) -> None:
    for build in (
        lambda m: AutoMultivariateNormal(m, init_loc_fn=init_to_small()),
        lambda m: AutoIAFNormal(m, hidden_dim=[64], num_transforms=1),
    ):
        model = EFA.from_data(tiny, family="poisson", **TINY)
        f = fit(model, tiny, guide=build(model), num_epochs=2, batch_size=10, progress=False)
        assert f.guide_name == type(f.guide).__name__ and not f.point_estimate
        plug, mc = log_likelihood(f, tiny), log_likelihood(f, tiny, num_samples=4)
        assert torch.isfinite(plug).all() and torch.isfinite(mc).all()
        with pytest.raises(TypeError, match="guide was given by name.*map, normal, lowrank, mvn, iaf"):
            save(f, tmp_path / "x")


def test_guide_list_of_a_point_and_a_normal(tiny: EFAData) -> None:
    model = EFA.from_data(tiny, family="poisson", **TINY)
    guide = AutoGuideList(model)
    guide.append(AutoDelta(poutine.block(model, expose=["alpha"]), init_loc_fn=init_to_small()))
    guide.append(AutoNormal(poutine.block(model, expose=["rho"]), init_loc_fn=init_to_small()))
    f = fit(model, tiny, guide=guide, num_epochs=2, batch_size=10, progress=False)
    assert not f.point_estimate  # rho has a spread
    plug = f.median(tiny)
    assert set(plug) == {"alpha", "rho"}
    torch.testing.assert_close(plug["rho"], guide[1].median(tiny)["rho"])
    torch.testing.assert_close(plug["alpha"], guide[0].median(tiny)["alpha"])


class HandMAP(PyroModule):
    """A hand-written guide: point masses at two learned tables."""

    def __init__(self, efa: EFA) -> None:
        super().__init__()
        d = efa.dim
        self.alpha_loc = torch.nn.Parameter(torch.empty(efa.num_keys, d).uniform_(-0.05, 0.05))
        self.rho_loc = torch.nn.Parameter(torch.empty(efa.num_rows, d).uniform_(-0.05, 0.05))

    def forward(self, data: EFAData, sample: bool = False) -> None:
        pyro.sample("alpha", dist.Delta(self.alpha_loc, event_dim=2))
        pyro.sample("rho", dist.Delta(self.rho_loc, event_dim=2))


def test_a_hand_written_guide(tiny: EFAData) -> None:
    model = EFA.from_data(tiny, family="poisson", **TINY)
    guide = HandMAP(model)
    f = fit(model, tiny, guide=guide, num_epochs=3, batch_size=10, lr=0.05, progress=False)
    assert f.losses[-1] < f.losses[0]
    torch.testing.assert_close(f.median(tiny)["alpha"], guide.alpha_loc.detach())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fit(model, tiny, guide=lambda data, sample=False: None, num_epochs=1, progress=False)


def test_an_amortized_guide_of_per_unit_latents() -> None:
    """Per-unit intercepts from an encoder of each unit's data: trained every step, and new
    units get a posterior too (the library finds that the guide is amortized)."""
    data = intercept_data(40)
    model = RandomIntercept(EFA.from_data(data, name="efa", **TINY))
    guide = AmortizedIntercept(model)
    f = fit(model, data, guide=guide, num_epochs=30, batch_size=8, lr=0.03, progress=False)
    assert amortized(f)
    w = guide.weight.detach()
    assert w[0] > 0.3, w  # the encoder learned that a unit's mean carries its intercept
    new = intercept_data(10, first=1000, seed=7)
    m = evaluate(f, new)  # units never seen in training: scored, not refused
    assert math.isfinite(m["nll"])
    u = f.median(new)["u"].squeeze(-1)
    seen = new.target & new.mask
    means = (new.values * seen).sum(-1) / seen.sum(-1)
    torch.testing.assert_close(u, w[0] * means + w[1])
    assert guide_name(f.guide) == "AmortizedIntercept"


def test_a_per_unit_guide_with_parameters_is_not_amortized() -> None:
    data = intercept_data(12)
    model = RandomIntercept(EFA.from_data(data, name="efa", **TINY))
    f = fit(model, data, guide="normal", num_epochs=1, batch_size=4, progress=False)
    assert not amortized(f)


class LinearIntercept(PyroModule):
    """An amortized guide whose encoder is an ``nn.Linear`` (weights drawn at construction)."""

    def __init__(self, model: RandomIntercept) -> None:
        super().__init__()
        self.globals = AutoNormal(poutine.block(model, hide=["u"]), init_loc_fn=init_to_small())
        self.plates = model.efa.create_plates
        self.encoder = torch.nn.Linear(1, 2)

    def forward(self, data: EFAData, sample: bool = False) -> None:
        self.globals(data)
        seen = data.target & data.mask
        mean = (data.values * seen).sum(-1, keepdim=True) / seen.sum(-1, keepdim=True).clamp(min=1)
        loc, raw = self.encoder(mean).unbind(-1)
        with self.plates(data):
            pyro.sample("u", dist.Normal(loc.unsqueeze(-1), torch.nn.functional.softplus(raw).unsqueeze(-1)))


def test_the_seed_also_draws_a_guide_objects_weights() -> None:
    data = intercept_data(16)
    losses = []
    for state in (1, 2):
        pyro.set_rng_seed(state)  # the model and the guide's encoder drawn from other states
        model = RandomIntercept(EFA.from_data(data, name="efa", **TINY))
        guide = LinearIntercept(model)
        f = fit(model, data, guide=guide, num_epochs=2, batch_size=4, seed=9, progress=False)
        losses.append(f.losses)
    assert losses[0] == losses[1]
