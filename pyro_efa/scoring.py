r"""The one scoring path: every held-out number of a fit comes from here.

For one fit and one data set, a :class:`Scorer`

1. puts the data in the fit's vocabularies (:meth:`EFAData.conform <pyro_efa.EFAData.conform>`:
   keys, items and classes re-mapped by label, whatever vocabulary the data was built with),
   checks it against the model (:meth:`EFA.validate <pyro_efa.EFA.validate>`) and, for a model
   with per-unit latent sites whose guide holds one parameter per training unit, maps the data's
   units to the training units by label (refusing units the fit never saw);
2. takes the values of the latent sites from one pass of the guide over the data
   (:meth:`Scorer.latents`): the *plug-in* values (every draw of the guide replaced by its
   distribution's mean: the posterior median of Normal-based guides, pushed through their
   bijections; the MAP for ``"map"``), or one draw;
3. runs the model on each batch of units conditioned on those values, cutting per-unit values to
   the batch's units, and reads off each target's conditional distribution
   :math:`p(x_{ui} \mid x_{c_{ui}}, \theta)`: its log-density at the observed value, the point
   prediction of its family, its natural parameters and, on request, one draw
   (:meth:`Scorer.score`).

Validation inside :func:`pyro_efa.fit`, :func:`pyro_efa.evaluate`,
:func:`pyro_efa.log_likelihood`, :func:`pyro_efa.predict`,
:func:`pyro_efa.posterior_predictive`, :mod:`pyro_efa.diagnostics` and
:mod:`pyro_efa.generate` all use it.

**Monte Carlo.** :meth:`Scorer.latent_draws` makes every guide draw first and scoring follows,
so that two functions called with the same seed (``log_likelihood`` and
``diagnostics.to_inference_data``) see the same draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import TransformedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .data import EFAData
from .errors import InputError
from .model import data_check

if TYPE_CHECKING:
    from .model import EFA
    from .results import EFAFit

__all__ = [
    "Latents",
    "Scorer",
    "Scores",
    "amortized",
    "eval_mode",
    "log_base_measure",
    "model_device",
    "per_unit_sites",
    "seeded",
]


@dataclasses.dataclass
class Latents:
    """Values of the latent sites of a model for the units of one data set.

    :ivar dict values: site name to value. A per-unit site (inside the unit plate) has one row
        per unit along its unit dim.
    :ivar dict units: per-unit site name to ``(dim, unit_index)``: the dim of the value that runs
        over units, and the unit-plate index of each row.
    """

    values: dict[str, torch.Tensor]
    units: dict[str, tuple[int, torch.Tensor]]

    def for_batch(self, batch: EFAData) -> dict[str, torch.Tensor]:
        """The values for the units of ``batch``: per-unit values cut to its units, in its order."""
        out = dict(self.values)
        for name, (dim, rows) in self.units.items():
            index = batch.unit_index.to(rows.device)
            where = torch.full(
                (int(max(rows.max(), index.max())) + 1,), -1, dtype=torch.long, device=rows.device
            )
            where[rows] = torch.arange(rows.numel(), device=rows.device)
            pos = where[index]
            if (pos < 0).any():  # a bug, not a user error: latents are taken for the scored data
                raise RuntimeError(f"per-unit site {name!r} has no value for some units of the batch")
            out[name] = self.values[name].index_select(dim, pos.to(self.values[name].device))
        return out


@dataclasses.dataclass
class Scores:
    """What one scoring pass gives for every observation of a data set, ``(U, L)`` like its
    ``values``.

    :ivar ~torch.Tensor loglik: :math:`\\log p(x_{ui} \\mid x_{c_{ui}}, \\theta)` of each target,
        0 elsewhere.
    :ivar ~torch.Tensor prediction: the family's point prediction (the mean; for class labels the
        most likely class), NaN off the targets.
    :ivar ~torch.Tensor probability: the probability of the predicted class, NaN elsewhere.
    :ivar ~torch.Tensor rank: for class labels, the rank of the observed class among all classes
        (1: the most likely; :meth:`~pyro_efa.families.Family.rank`), NaN elsewhere.
    :ivar ~torch.Tensor draw: one draw of each target from its conditional (``sample=True``),
        the observed values elsewhere.
    :ivar ~torch.Tensor eta: ``(U, L, D)`` natural parameters of each target (``eta=True``).
    """

    loglik: torch.Tensor
    prediction: torch.Tensor
    probability: torch.Tensor
    rank: torch.Tensor
    draw: torch.Tensor | None = None
    eta: torch.Tensor | None = None


class _PlugIn(Messenger):
    """Replaces every draw of a guide by its distribution's center (see :func:`_center`)."""

    def _pyro_sample(self, msg: Any) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        msg["value"] = _center(msg["fn"], msg["name"])
        msg["done"] = True


def _center(fn: Any, name: str) -> torch.Tensor:
    # the mean (Delta: its point; Normal and multivariate normal: their loc, so that the guide's
    # bijection gives the posterior median); a flow without a closed-form mean: its base
    # distribution's mean pushed through the flow
    try:
        return fn.mean
    except NotImplementedError:
        if isinstance(fn, TransformedDistribution):
            x = _center(fn.base_dist, name)
            for t in fn.transforms:
                x = t(x)
            return x
        raise InputError(
            f"the guide's distribution at site {name!r} ({type(fn).__name__}) has no mean to plug "
            "in; score with Monte Carlo draws instead (num_samples > 0)"
        ) from None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block (no dropout, every target scored), the previous mode
    restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def log_base_measure(efa: EFA, data: EFAData) -> torch.Tensor:
    """``log h(x)`` of every target of ``data`` under its family, ``(U, L)``, 0 elsewhere."""
    out = torch.zeros(data.values.shape, dtype=data.values.dtype)
    targets = data.target & data.mask
    fam = efa.key_family.cpu()[data.key_index]
    for f, family in enumerate(efa.families):
        m = targets & (fam == f)
        out = torch.where(m, family.log_base_measure(family.fill(data.values, m)), out)
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for an empty module)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


class Scorer:
    """Scores one data set with one fit (see the module docs).

    :param EFAFit fit: the fit.
    :param EFAData data: the units to score.
    :param int batch_size: units per model evaluation.
    :param bool validate: check the data (:meth:`EFA.validate`); off only for data the library
        built itself (the blank units of :mod:`pyro_efa.generate`).
    :raises ValueError: for data the model cannot score, and for units the guide has no
        per-unit latent values for.
    """

    def __init__(self, fit: EFAFit, data: EFAData, batch_size: int = 256, validate: bool = True) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.fit = fit
        self.efa = fit.efa
        data = data.conform(fit.schema)
        if validate:
            data_check(fit.model)(data)
        #: the scored data in the fit's vocabularies, on the CPU (the ``data`` attribute is on the
        #: model's device)
        self.source = data
        self.device = model_device(fit.model)
        self.data = self._units_for_guide(data).to(self.device)  # the guide reads all of it
        self.batches = [(idx, self.data.subset(idx)) for idx in torch.arange(len(data)).split(batch_size)]

    # -- latent values -----------------------------------------------------------------------------
    def latents(self, plug_in: bool = True) -> Latents:
        """The latent values for the units of the data, from one pass of the guide: plug-in
        values (every draw replaced by its distribution's mean) or, with ``plug_in=False``, one
        draw (from the current random state)."""
        with torch.no_grad(), eval_mode(self.fit.model), _PlugIn() if plug_in else contextlib.nullcontext():
            trace = poutine.trace(self.fit.guide).get_trace(self.data)
        return _latents_of(trace, self.efa.site_name("units"))

    def latent_draws(self, num_samples: int) -> list[Latents]:
        """``num_samples`` draws (all made before any scoring, from the current random state)."""
        if num_samples < 1:
            raise InputError(f"num_samples must be positive, got {num_samples}")
        return [self.latents(plug_in=False) for _ in range(num_samples)]

    # -- scoring -------------------------------------------------------------------------------------
    def score(self, latents: Latents, *, sample: bool = False, eta: bool = False) -> Scores:
        """Score every target given the latent values (one model pass per batch).

        :param bool sample: also draw every target from its conditional (:attr:`Scores.draw`).
        :param bool eta: also keep the natural parameters (:attr:`Scores.eta`).
        """
        values = self.data.values
        nan = torch.full_like(values, float("nan"))
        out = Scores(
            loglik=torch.zeros_like(values),
            prediction=nan,
            probability=nan.clone(),
            rank=nan.clone(),
            draw=values.clone() if sample else None,
        )
        with torch.no_grad(), eval_mode(self.fit.model):
            for idx, batch in self.batches:
                conditioned = poutine.condition(self.fit.model, data=latents.for_batch(batch))
                trace = poutine.trace(conditioned).get_trace(batch, sample=sample)
                self._read(trace, batch, idx.to(self.device), out, eta)
        return out

    def loglik_total(self, latents: Latents | None = None) -> torch.Tensor:
        """The sum of the log-likelihood of every target (float64, on the model's device), at the
        plug-in values unless ``latents`` are given."""
        scores = self.score(self.latents(plug_in=True) if latents is None else latents)
        return scores.loglik.sum(dtype=torch.float64)

    def _read(self, trace: Any, batch: EFAData, idx: torch.Tensor, out: Scores, eta: bool) -> None:
        efa, width = self.efa, batch.max_len
        targets = batch.target & batch.mask
        fam = efa.key_family[batch.key_index]
        for f, (family, name) in enumerate(zip(efa.families, efa.observed_sites, strict=True)):
            if name not in trace.nodes:
                continue
            site = trace.nodes[name]
            m = targets & (fam == f)
            d = site["fn"].base_dist  # the model masks the family's distribution to its targets
            x = family.as_observation(family.fill(batch.values, m))
            lp = d.log_prob(x)
            out.loglik[idx, :width] += torch.where(m, lp, torch.zeros_like(lp))
            pred, prob = family.point_prediction(d)
            out.prediction[idx, :width] = torch.where(m, pred.to(lp.dtype), out.prediction[idx, :width])
            if prob is not None:
                out.probability[idx, :width] = torch.where(m, prob, out.probability[idx, :width])
            rank = family.rank(d, x)
            if rank is not None:
                out.rank[idx, :width] = torch.where(m, rank.to(lp.dtype), out.rank[idx, :width])
            if out.draw is not None:
                drawn = site["value"].to(out.draw.dtype)
                out.draw[idx, :width] = torch.where(m, drawn, out.draw[idx, :width])
            if eta:
                e = site["infer"]["eta"]
                if out.eta is None:
                    shape = (*out.loglik.shape, efa.readout_rows.size(-1))
                    out.eta = torch.full(shape, float("nan"), dtype=e.dtype, device=e.device)
                block = out.eta[idx, :width, : e.size(-1)]
                out.eta[idx, :width, : e.size(-1)] = torch.where(m[..., None], e, block)

    # -- which units the guide knows -----------------------------------------------------------------
    def _units_for_guide(self, data: EFAData) -> EFAData:
        """``data`` with the unit-plate indices the guide expects: unchanged unless the model has
        per-unit latent sites and the guide holds one parameter per training unit, in which case
        the units are mapped to the training units by label."""
        if not per_unit_sites(self.fit) or amortized(self.fit):
            return data
        train = self.fit.train_units
        sites = sorted(per_unit_sites(self.fit))
        if train is None:
            raise InputError(
                f"the model has per-unit latent site(s) {sites} but the fit does not know its training "
                "units (streamed data); only an amortized guide can score it"
            )
        where = {label: i for label, i in zip(train.labels, train.index.tolist(), strict=True)}
        unknown = [label for label in data.unit_labels if label not in where]
        if unknown:
            raise InputError(
                f"{len(unknown)} unit(s) of the data, e.g. {unknown[:3]}, are not among the fit's "
                f"{len(train.labels)} training units; the model has per-unit latent site(s) {sites} "
                f"and the guide ({self.fit.guide_name}) holds one value per training unit, so it has no "
                "posterior for new units. Score training units (e.g. their held-out observations), "
                "or fit an amortized guide that computes per-unit latents from a unit's data"
            )
        index = torch.tensor([where[label] for label in data.unit_labels], dtype=torch.long)
        return dataclasses.replace(data, unit_index=index, num_units=train.num_units)


def _latents_of(trace: Any, units_plate: str) -> Latents:
    values: dict[str, torch.Tensor] = {}
    units: dict[str, tuple[int, torch.Tensor]] = {}
    rows = trace.nodes[units_plate]["value"] if units_plate in trace.nodes else None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if site["infer"].get("is_auxiliary"):
            continue
        values[name] = site["value"].detach()
        for frame in site["cond_indep_stack"]:
            if frame.name == units_plate and rows is not None:
                units[name] = (frame.dim - site["fn"].event_dim, rows)
    return Latents(values, units)


# ------------------------------------------------------------------------------------------------
# what a fit's guide is like (computed once per fit, kept on it)
def per_unit_sites(fit: EFAFit) -> set[str]:
    """Latent sites of the fit's model inside its unit plate (per-unit latents of a larger model),
    read off one run of the model on a probe unit (latents drawn from the prior; the global
    random state is restored)."""
    cached = fit.__dict__.get("_per_unit_sites")
    if cached is None:
        probe = _probe_batch(fit, training_units=False)
        with torch.no_grad(), eval_mode(fit.model), seeded(0):
            trace = poutine.trace(fit.model).get_trace(probe)
        cached = set(_latents_of(trace, fit.efa.site_name("units")).units)
        fit.__dict__["_per_unit_sites"] = cached
    return cached


def amortized(fit: EFAFit) -> bool:
    """Whether the guide computes its per-unit latent values from each unit's data (an amortized
    guide) rather than holding one parameter per training unit.

    Measured, not declared: the guide's plug-in values for a few training units must not change
    when the same units are given unit-plate indices the fit never saw."""
    cached = fit.__dict__.get("_amortized")
    if cached is None:
        probe = _probe_batch(fit)
        moved = dataclasses.replace(
            probe,
            unit_index=torch.arange(len(probe)) + probe.num_units,
            num_units=probe.num_units + len(probe),
        )
        cached = False
        try:
            a, b = (_plugin_per_unit(fit, d) for d in (probe, moved))
            cached = a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
        except (ValueError, IndexError, RuntimeError, AssertionError):
            cached = False
        fit.__dict__["_amortized"] = cached
    return cached


def _plugin_per_unit(fit: EFAFit, data: EFAData) -> dict[str, torch.Tensor]:
    with torch.no_grad(), eval_mode(fit.model), _PlugIn():
        trace = poutine.trace(fit.guide).get_trace(data)
    latents = _latents_of(trace, fit.efa.site_name("units"))
    return {k: latents.for_batch(data)[k] for k in latents.units}


def _probe_batch(fit: EFAFit, training_units: bool = True) -> EFAData:
    """Units of one observation to probe the model or the guide: a few of the training units when
    known and asked for, else one unit of a plate of one."""
    efa = fit.efa
    train = fit.train_units if training_units else None
    index = train.index[:4] if train is not None else torch.zeros(1, dtype=torch.long)
    n = len(index)
    family = efa.families[int(efa.key_family[0])]
    device = model_device(fit.model)
    return EFAData(
        kind=efa.kind,
        key_index=torch.zeros(n, 1, dtype=torch.long, device=device),
        values=torch.full((n, 1), float(family.fill_value), dtype=torch.get_default_dtype(), device=device),
        mask=torch.ones(n, 1, dtype=torch.bool, device=device),
        target=torch.ones(n, 1, dtype=torch.bool, device=device),
        unit_index=index.to(device),
        num_units=train.num_units if train is not None else 1,
        keys=fit.schema["keys"],
        items=fit.schema["items"],
        unit_labels=list(range(n)),
        columns=fit.schema["columns"],
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draws from ``seed`` inside the block (torch, Python and NumPy generators, as
    :func:`pyro.set_rng_seed`); every global random state is restored after it."""
    with torch.random.fork_rng():
        state = pyro.util.get_rng_state()
        pyro.set_rng_seed(seed)
        try:
            yield
        finally:
            pyro.util.set_rng_state(state)
