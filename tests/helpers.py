"""Helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyro_efa import EFA, EFAData


class RandomIntercept(PyroModule):
    """A user's model: EFA plus a per-unit random intercept ``u ~ Normal(0, scale)`` on the
    natural parameter."""

    def __init__(self, efa: EFA, scale: float = 2.0) -> None:
        super().__init__()
        self.efa = efa
        self.scale = scale

    def forward(self, data: EFAData, sample: bool = False) -> torch.Tensor:
        eta = self.efa.natural_params(data)
        units = self.efa.create_plates(data)
        with units:
            u = pyro.sample("u", dist.Normal(0.0, self.scale))  # (B, 1)
        return self.efa.observe(data, eta + u.unsqueeze(-1), sample=sample, units=units)


def metric_block(text: str) -> list[str]:
    """The indented metric lines printed by ``pyro-efa fit`` / ``evaluate``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "metrics (" in line)
    return [line for line in lines[start + 1 :] if line.startswith("  ")]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single ``pyro-efa: error: ...`` line on stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pyro-efa: error: ")
    return err[0]


def loglik_by_hand(fitted, data: EFAData, num_samples: int, seed: int) -> torch.Tensor:
    """``(S, U, L)`` log-likelihood of every target under ``num_samples`` guide draws, computed
    with plain Pyro traces (guide draws first, then the model conditioned on each draw): an
    oracle for the library's scoring path, for models without per-unit latent sites."""
    from pyro_efa.scoring import seeded

    efa = fitted.efa
    out = []
    with seeded(seed), torch.no_grad():
        draws = []
        for _ in range(num_samples):
            g = pyro.poutine.trace(fitted.guide).get_trace(data)
            draws.append(
                {
                    k: v["value"]
                    for k, v in g.nodes.items()
                    if k in (efa.site_name("alpha"), efa.site_name("rho"))
                }
            )
        for values in draws:
            tr = pyro.poutine.trace(pyro.poutine.condition(fitted.model, data=values)).get_trace(data)
            total = torch.zeros(data.values.shape)
            for f, name in enumerate(efa.observed_sites):
                site = tr.nodes[name]
                m = data.target & data.mask & (efa.key_family[data.key_index] == f)
                lp = site["fn"].base_dist.log_prob(site["value"])
                total += torch.where(m, lp, 0.0)
            out.append(total)
    return torch.stack(out)


def intercept_data(num_users: int, n: int = 4, seed: int = 1, first: int = 0) -> EFAData:
    """Gaussian values with a strong per-user offset (the setting of a random intercept), users
    ``first .. first + num_users - 1``, ``n`` observations each."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    users = np.arange(first, first + num_users)
    df = pd.DataFrame(
        {
            "user": np.repeat(users, n),
            "key": np.tile(np.arange(n), num_users),
            "x": np.repeat(rng.normal(0, 2, size=num_users), n) + rng.normal(0, 0.5, size=num_users * n),
        }
    )
    return EFAData.from_pandas(df, unit="user", key="key", value="x", order="key")


class AmortizedIntercept(PyroModule):
    """A user-written guide of :class:`RandomIntercept`: AutoNormal over the global sites, and an
    *amortized* ``q(u) = Normal(w0 * mean(x) + w1, softplus(c))`` of each unit's intercept from its
    modelled observations, so that every step trains it and new units get a posterior too."""

    def __init__(self, model: RandomIntercept) -> None:
        from pyro.infer.autoguide import AutoNormal

        from pyro_efa.guides import init_to_small

        super().__init__()
        self.globals = AutoNormal(pyro.poutine.block(model, hide=["u"]), init_loc_fn=init_to_small())
        self.plates = model.efa.create_plates  # a bound method, not a submodule
        self.weight = torch.nn.Parameter(torch.tensor([0.5, 0.0]))
        self.raw_scale = torch.nn.Parameter(torch.tensor(-2.0))

    def forward(self, data: EFAData, sample: bool = False) -> None:
        self.globals(data)
        seen = data.target & data.mask
        mean = (data.values * seen).sum(-1) / seen.sum(-1).clamp(min=1)
        loc = self.weight[0] * mean + self.weight[1]
        with self.plates(data):
            pyro.sample("u", dist.Normal(loc.unsqueeze(-1), torch.nn.functional.softplus(self.raw_scale)))
