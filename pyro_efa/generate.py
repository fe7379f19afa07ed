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
import torch

from .data import EFAData
from .errors import InputError
from .results import EFAFit
from .scoring import Scorer, per_unit_sites, seeded

__all__ = ["sample_units"]


def _blank_units(fitted: EFAFit, num_units: int, keys: Sequence[Any] | None, length: int | None) -> EFAData:
    schema, efa = fitted.schema, fitted.efa
    if efa.kind == "items":
        if not length or length < 1:
            raise InputError("item sequences need a positive length")
        key_index = torch.zeros(num_units, length, dtype=torch.long)
    else:
        if not keys:
            raise InputError("valued data needs the sequence of keys of each new unit")
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

    Each step draws one position of every unit from its conditional given the unit's current
    values, through the scoring path of :mod:`pyro_efa.scoring` (so a larger model's own terms
    are included).

    :param EFAFit fitted: the fit.
    :param int num_units: number of units to generate.
    :param keys: for valued data, the key labels of the new units' observations, in order.
    :param int length: for item sequences, the number of items per unit.
    :param int num_sweeps: Gibbs sweeps (bidirectional models only).
    :param str embeddings: ``"median"`` (plug in the posterior median / MAP) or ``"sample"``
        (one draw from the guide for all units).
    :param int seed: random seed (the global random state is restored).
    :returns: a long table with columns unit, position, key, value.
    :raises ValueError: for a model with per-unit latent sites: new units have no data to infer
        them from.
    """
    if embeddings not in ("median", "sample"):
        raise InputError(f"embeddings must be 'median' or 'sample', got {embeddings!r}")
    sites = per_unit_sites(fitted)
    if sites:
        raise InputError(
            f"the model has per-unit latent site(s) {sorted(sites)}; new units have no data to infer "
            "them from, so sample_units generates from models without per-unit latents only"
        )
    data = _blank_units(fitted, num_units, keys, length)
    with seeded(seed):
        latents = Scorer(fitted, data, validate=False).latents(plug_in=embeddings == "median")
        values = data.values.clone()
        # uni: one ancestral pass; bi: an initial pass from the current state, then Gibbs sweeps
        sweeps = 1 if fitted.efa.direction == "uni" else 1 + num_sweeps
        for _ in range(sweeps):
            for i in range(data.max_len):
                scorer = Scorer(fitted, dataclasses.replace(data, values=values), validate=False)
                draw = scorer.score(latents, sample=True).draw
                assert draw is not None
                values[:, i] = draw[:, i].cpu()
    return dataclasses.replace(data, values=values).to_pandas().drop(columns="target")
