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
                {k: v["value"] for k, v in g.nodes.items() if k in (efa.site_name("alpha"), efa.site_name("rho"))}
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
