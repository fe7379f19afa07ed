"""Generating new units from a fitted EFA.

- ``direction="uni"``: the conditionals multiply to a joint density (chain rule), so
  :func:`sample_units` draws each observation given the ones before it (ancestral sampling,
  exact).
- ``direction="bi"``: the conditionals form a dependency network whose product is a
  pseudo-likelihood, not a density. :func:`sample_units` runs Gibbs sampling: it starts from
  draws of each conditional and resamples every observation given all the others for
  ``num_sweeps`` sweeps. Its stationary distribution is that of the dependency network, which
  matches a joint distribution only when the conditionals are compatible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .data import EFAData
from .infer import EFAFit

__all__ = ["sample_units"]


def _blank_units(fitted: EFAFit, num_units: int, keys: Sequence[Any] | None, length: int | None) -> EFAData:
    schema, efa = fitted.schema, fitted.efa
    if efa.kind == "items":
        if not length or length < 1:
            raise ValueError("item sequences need a positive length")
        key_index = torch.zeros(num_units, length, dtype=torch.long)
    else:
        if not keys:
            raise ValueError("valued data needs the sequence of keys of each new unit")
        codes = torch.as_tensor(schema["keys"].lookup(list(keys), "keys"))
        key_index = codes.expand(num_units, -1).clone()
    n = key_index.size(1)
    values = torch.zeros(num_units, n, dtype=torch.get_default_dtype())
    for f, family in enumerate(efa.families):
        values = torch.where(efa.key_family[key_index] == f, float(family.fill_value), values)
    ones = torch.ones(num_units, n, dtype=torch.bool)
    return EFAData(
        kind=efa.kind,
        key_index=key_index,
        values=values,
        mask=ones,
        target=ones.clone(),
        unit_index=torch.arange(num_units),
        num_units=num_units,
        keys=schema["keys"],
        items=schema["items"],
        unit_labels=list(range(num_units)),
        columns=schema["columns"],
    )


@torch.no_grad()
def _draw(fitted: EFAFit, data: EFAData, params: dict[str, torch.Tensor], position: int) -> torch.Tensor:
    """Draw every unit's observation at ``position`` from its conditional given the others."""
    efa = fitted.efa
    select = torch.zeros_like(data.mask)
    select[:, position] = True
    with poutine.condition(data=params):
        eta = efa.natural_params(data, select=select)[:, position]
    k = data.key_index[:, position]
    x = torch.zeros(len(data), dtype=data.values.dtype)
    for f, family in enumerate(efa.families):
        m = efa.key_family[k] == f
        if m.any():
            x[m] = family.dist(eta[m, : family.natural_dim], k[m]).sample().to(x.dtype)
    return x


def sample_units(
    fitted: EFAFit,
    num_units: int = 1,
    keys: Sequence[Any] | None = None,
    length: int | None = None,
    *,
    num_sweeps: int = 20,
    embeddings: str = "median",
    seed: int = 0,
) -> pd.DataFrame:
    """Generate new units from a fitted model.

    :param EFAFit fitted: the fit (of an :class:`~pyro_efa.EFA` model).
    :param int num_units: number of units to generate.
    :param keys: for valued data, the key labels of the new units' observations, in order.
    :param int length: for item sequences, the number of items per unit.
    :param int num_sweeps: Gibbs sweeps (bidirectional models only).
    :param str embeddings: ``"median"`` (plug in the posterior median / MAP) or ``"sample"``
        (one draw from the guide for all units).
    :param int seed: random seed.
    :returns: a long table with columns unit, position, key, value.
    """
    if embeddings not in ("median", "sample"):
        raise ValueError(f"embeddings must be 'median' or 'sample', got {embeddings!r}")
    efa = fitted.efa
    data = _blank_units(fitted, num_units, keys, length)
    was_training = efa.training
    efa.eval()
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        if embeddings == "median":
            params = fitted.median(data)
        else:
            trace = poutine.trace(fitted.guide).get_trace(data)
            params = {
                k: v["value"].detach()
                for k, v in trace.nodes.items()
                if v["type"] == "sample" and not site_is_subsample(v)
            }
        n = data.max_len
        values = data.values.clone()
        # uni: one ancestral pass; bi: an initial pass from the current state, then Gibbs sweeps
        sweeps = 1 if efa.direction == "uni" else 1 + num_sweeps
        for _ in range(sweeps):
            for i in range(n):
                values[:, i] = _draw(fitted, dataclasses.replace(data, values=values), params, i)
    efa.train(was_training)
    return dataclasses.replace(data, values=values).to_pandas().drop(columns="target")
