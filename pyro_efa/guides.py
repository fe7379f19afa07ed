"""Guides: the posterior approximations :func:`pyro_efa.fit` trains.

:func:`pyro_efa.fit` takes a guide by name (:data:`GUIDES`, built by :func:`make_guide`) or any Pyro
guide object: an autoguide instance (:class:`~pyro.infer.autoguide.AutoMultivariateNormal`,
:class:`~pyro.infer.autoguide.AutoIAFNormal`, an :class:`~pyro.infer.autoguide.AutoGuideList`
mixing parts, ...) or a guide you wrote, for example an *amortized* guide that computes the
posterior of per-unit latent variables from each unit's data. A guide is called like the model,
``guide(data, sample=False)``, and its per-unit sites must sit inside the model's unit plate
(``efa.create_plates(data)``).

The network weights are point estimates in every case; a guide covers the latent sites (the
embedding tables ``alpha`` and ``rho``, and any latent site of a larger model).

Named guides start the embedding tables small (:func:`init_to_small`: uniform in ``(-0.05,
0.05)``; draws from the ``Normal(0, 1)`` prior train much worse) and the posterior standard
deviations of Normal guides at ``init_scale=0.01`` (an ``AutoNormal`` you build yourself starts
at Pyro's 0.1 unless you pass ``init_scale``); they can be saved with
:func:`pyro_efa.save`: the name and options are stored and the guide is rebuilt on load. A guide
object given to :func:`pyro_efa.fit` cannot be rebuilt from a file; keep its ``state_dict()``
yourself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoGuideList,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
)

from .errors import InputError
from .model import EFA, find_efa

__all__ = ["GUIDES", "guide_name", "init_to_small", "is_point_estimate", "make_guide", "recipe"]

#: guide names accepted by :func:`make_guide` and :func:`pyro_efa.fit`, with their options
GUIDES: dict[str, tuple[type[AutoGuide], tuple[str, ...]]] = {
    "map": (AutoDelta, ()),  # MAP in constrained space
    "normal": (AutoNormal, ("init_scale",)),  # mean field
    "lowrank": (AutoLowRankMultivariateNormal, ("rank", "init_scale")),
    "mvn": (AutoMultivariateNormal, ("init_scale",)),
    "iaf": (AutoIAFNormal, ("hidden_dim", "num_transforms")),
}
# guides that take the model's unit plate (per-unit latent sites are subsampled with the units)
_PLATED = ("map", "normal")
_DEFAULTS: dict[str, Any] = {"init_scale": 0.01, "rank": 8}
_RECIPE = "_pyro_efa_recipe"


def init_to_small(radius: float = 0.05) -> Callable[[dict], torch.Tensor]:
    """An ``init_loc_fn`` for autoguides: the embedding tables (sites ``alpha``, ``rho``, under
    any prefix) start uniform in ``(-radius, radius)``; other latent sites at their prior median.

    The draws are made in float64 on the CPU generator whatever the dtype and device, so that a
    fit starts the same way in float32 and float64, on the CPU and on a GPU.
    """

    def init(site: dict) -> torch.Tensor:
        if site["name"].split(".")[-1] in ("alpha", "rho"):
            shape, mean = site["fn"].shape(), site["fn"].mean
            value = torch.empty(shape, dtype=torch.float64).uniform_(-radius, radius)
            return value.to(device=mean.device, dtype=mean.dtype)
        return init_to_median(site)

    return init


def make_guide(
    model: torch.nn.Module, name: str = "map", *, init_radius: float = 0.05, **options: Any
) -> AutoGuide:
    """A guide from :data:`GUIDES` over the latent sites of ``model``.

    - ``"map"``: :class:`~pyro.infer.autoguide.AutoDelta` (MAP in constrained space);
    - ``"normal"``: :class:`~pyro.infer.autoguide.AutoNormal` (mean field; option ``init_scale``,
      the initial posterior standard deviation, default 0.01);
    - ``"lowrank"``: :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` (``rank``,
      default 8; ``init_scale``);
    - ``"mvn"``: :class:`~pyro.infer.autoguide.AutoMultivariateNormal` (``init_scale``);
    - ``"iaf"``: :class:`~pyro.infer.autoguide.AutoIAFNormal` (``hidden_dim``,
      ``num_transforms``).

    ``"map"`` and ``"normal"`` take the model's unit plate, so they handle per-unit latent sites
    of a larger model with minibatches; the joint guides (``"lowrank"``, ``"mvn"``, ``"iaf"``)
    cover global sites only.

    :param model: an :class:`~pyro_efa.EFA` or a larger model holding one.
    :param str name: a key of :data:`GUIDES`.
    :param float init_radius: embeddings start uniform in ``(-init_radius, init_radius)``.
    :param options: options of the guide (see above).
    :raises ValueError: for an unknown name or option.
    """
    if name not in GUIDES:
        raise InputError(
            f"unknown guide {name!r}; guides by name: {', '.join(GUIDES)} (or pass a guide object)"
        )
    cls, allowed = GUIDES[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"guide {name!r} takes the option(s) {list(allowed)}, not {unknown}")
    kwargs = {
        k: options[k] if k in options else _DEFAULTS[k] for k in allowed if k in options or k in _DEFAULTS
    }
    if name in _PLATED:
        kwargs["create_plates"] = _unit_plate_if_needed(find_efa(model), lambda: guide)
    if name != "iaf":  # a flow starts at its own initialisation (AutoIAFNormal ignores init_loc_fn)
        kwargs["init_loc_fn"] = init_to_small(init_radius)
    guide = cls(model, **kwargs)
    setattr(guide, _RECIPE, {"name": name, "init_radius": init_radius, **options})
    return guide


def _unit_plate_if_needed(efa: EFA, guide: Callable[[], AutoGuide]) -> Callable[..., Any]:
    """``create_plates`` for an autoguide: the model's unit plate when a latent site of the guide
    sits in it (per-unit latents of a larger model), else none. A subsampled plate is rebuilt at
    every step, which costs a sizeable part of Pyro's overhead when nothing uses it."""
    needed: list[bool] = []

    def create_plates(data: Any, *args: Any, **kwargs: Any) -> Any:
        if not needed:
            trace = guide().prototype_trace
            units = efa.site_name("units")
            sites = trace.iter_stochastic_nodes() if trace is not None else []
            needed.append(any(f.name == units for _, site in sites for f in site["cond_indep_stack"]))
        return efa.create_plates(data) if needed[0] else []

    return create_plates


def recipe(guide: Any) -> dict[str, Any] | None:
    """How :func:`make_guide` built ``guide`` (its name and options), or ``None`` for a guide
    built otherwise (which :func:`pyro_efa.save` cannot rebuild)."""
    value = getattr(guide, _RECIPE, None)
    return dict(value) if value is not None else None


def guide_name(guide: Any) -> str:
    """The :data:`GUIDES` name of a guide built by :func:`make_guide`, else its class name."""
    r = recipe(guide)
    return str(r["name"]) if r is not None else type(guide).__name__


def is_point_estimate(guide: Any) -> bool:
    """Whether every draw of ``guide`` is the same point (an :class:`AutoDelta`, or an
    :class:`AutoGuideList` of them): posterior summaries then have one draw."""
    if isinstance(guide, AutoDelta):
        return True
    if isinstance(guide, AutoGuideList):
        return all(is_point_estimate(part) for part in guide)
    return False
