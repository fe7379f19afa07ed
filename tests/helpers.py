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
