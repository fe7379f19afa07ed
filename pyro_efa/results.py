"""A fitted model: :class:`EFAFit`, what :func:`pyro_efa.fit` returns and :func:`pyro_efa.load` reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from .config import FitOptions
from .data import EFAData
from .guides import is_point_estimate
from .model import EFA, find_efa

__all__ = ["EFAFit", "TrainUnits"]


@dataclasses.dataclass(frozen=True)
class TrainUnits:
    """The units a fit was trained on, for models with per-unit latent sites whose guide holds one
    parameter per training unit: scoring data maps its units to these by label.

    :ivar list labels: unit labels.
    :ivar ~torch.Tensor index: the unit-plate index of each labelled unit.
    :ivar int num_units: size of the unit plate.
    """

    labels: Sequence[Hashable]
    index: torch.Tensor
    num_units: int

    @classmethod
    def of(cls, data: EFAData) -> TrainUnits:
        """The units of ``data`` (its labels, unit-plate indices and plate size)."""
        return cls(labels=data.unit_labels, index=data.unit_index, num_units=data.num_units)


@dataclasses.dataclass
class EFAFit:
    """A fitted model with its guide and training history.

    :ivar model: the model (an :class:`~pyro_efa.EFA` or a larger model holding one).
    :ivar guide: the fitted guide.
    :ivar str guide_name: the name of a guide built by name (``"map"``, ``"normal"``, ...; see
        :data:`pyro_efa.guides.GUIDES`), else the guide's class name.
    :ivar list losses: mean training loss (negative ELBO per observation) of each epoch.
    :ivar list val_nll: validation NLL per observation after each epoch, at the plug-in values,
        with the base measure (``evaluate(...)["nll"]``, not ``"nll_no_base"``; empty without
        validation data).
    :ivar int best_epoch: the epoch whose state was restored (1-based; the last without
        validation data).
    :ivar float seconds: wall time of the fit.
    :ivar dict schema: what the data looked like: kind, columns, key and item vocabularies.
    :ivar FitOptions options: the options the fit ran with.
    :ivar TrainUnits train_units: the training units (``None`` when unknown, e.g. streamed data).
    """

    model: torch.nn.Module
    guide: Any
    guide_name: str
    losses: list[float]
    val_nll: list[float]
    best_epoch: int
    seconds: float
    schema: dict[str, Any]
    options: FitOptions = dataclasses.field(default_factory=FitOptions)
    train_units: TrainUnits | None = None

    @property
    def efa(self) -> EFA:
        """The :class:`~pyro_efa.EFA` inside the model."""
        return find_efa(self.model)

    @property
    def point_estimate(self) -> bool:
        """Whether the guide is a point estimate (MAP): posterior summaries have one draw."""
        return is_point_estimate(self.guide)

    def median(self, data: EFAData) -> dict[str, torch.Tensor]:
        """The plug-in value of every latent site for the units of ``data``: the posterior
        median of Normal-based guides (the MAP for ``"map"``); see
        :meth:`pyro_efa.scoring.Scorer.latents`. Per-unit sites hold one row per unit of
        ``data``, in its order."""
        from .scoring import Scorer

        return Scorer(self, data).latents(plug_in=True).values

    def evaluate(self, data: EFAData, **kwargs: Any) -> dict[str, Any]:
        """Shortcut for :func:`pyro_efa.evaluate`."""
        from .predictive import evaluate

        return evaluate(self, data, **kwargs)
