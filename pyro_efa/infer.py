"""Fitting EFA with SVI, held-out evaluation, prediction, and saving fits.

:func:`fit` runs stochastic variational inference with an autoguide over the latent embedding
sites (``"map"``: :class:`~pyro.infer.autoguide.AutoDelta`, i.e. MAP in constrained space;
``"normal"``: :class:`~pyro.infer.autoguide.AutoNormal`; ``"lowrank"``:
:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`). Network weights are point
estimates. Training stops early on the validation negative log-likelihood and restores the best
state. Everything is seeded.

The model may be an :class:`~pyro_efa.EFA` or any :class:`~pyro.nn.PyroModule` that holds one
and is called as ``model(data, sample=False)`` (a larger model composing EFA).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.distributions import MaskedDistribution
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_median,
)
from tqdm.auto import tqdm

from .data import EFAData, Vocabulary
from .model import EFA

__all__ = [
    "EFAFit",
    "evaluate",
    "find_efa",
    "fit",
    "load",
    "log_likelihood",
    "make_guide",
    "posterior_predictive",
    "predict",
    "save",
]

logger = logging.getLogger(__name__)

GUIDES = ("map", "normal", "lowrank")
FORMAT = "pyro_efa.fit/1"


def find_efa(model: torch.nn.Module) -> EFA:
    """The :class:`EFA` inside ``model`` (``model`` itself if it is one)."""
    for module in model.modules():
        if isinstance(module, EFA):
            return module
    raise TypeError(f"{type(model).__name__} holds no EFA module")


def _init_loc_fn(radius: float) -> Callable[[dict], torch.Tensor]:
    # Embedding tables start small: uniform(-radius, radius) (N(0, 1) draws from the prior train
    # much worse); other latent sites start at their prior median.
    def init(site: dict) -> torch.Tensor:
        if site["name"].split(".")[-1] in ("alpha", "rho"):
            shape = site["fn"].shape()
            return torch.empty(shape, dtype=site["fn"].mean.dtype).uniform_(-radius, radius)
        return init_to_median(site)

    return init


def make_guide(
    model: torch.nn.Module,
    guide: str = "map",
    *,
    rank: int = 8,
    init_scale: float = 0.01,
    init_radius: float = 0.05,
) -> AutoGuide:
    """An autoguide over the latent sites of ``model``.

    :param str guide: ``"map"``, ``"normal"`` or ``"lowrank"``.
    :param int rank: rank of the low-rank covariance.
    :param float init_scale: initial posterior standard deviation (variational guides).
    :param float init_radius: embeddings start uniform in ``(-init_radius, init_radius)``.
    """
    efa = find_efa(model)
    init = _init_loc_fn(init_radius)
    if guide == "map":
        return AutoDelta(model, init_loc_fn=init, create_plates=efa.create_plates)
    if guide == "normal":
        return AutoNormal(model, init_loc_fn=init, init_scale=init_scale, create_plates=efa.create_plates)
    if guide == "lowrank":
        return AutoLowRankMultivariateNormal(model, init_loc_fn=init, init_scale=init_scale, rank=rank)
    raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")


@dataclasses.dataclass
class EFAFit:
    """A fitted model with its guide and training history.

    :ivar model: the model (an :class:`EFA` or a larger model holding one).
    :ivar guide: the fitted autoguide.
    :ivar str guide_type: ``"map"``, ``"normal"`` or ``"lowrank"``.
    :ivar list losses: mean training loss (negative ELBO per observation) of each epoch.
    :ivar list val_nll: validation NLL per observation after each epoch (empty without
        validation data).
    :ivar int best_epoch: the epoch whose state was restored (1-based; the last without
        validation data).
    :ivar float seconds: wall time of the fit.
    :ivar dict schema: what the data looked like: kind, columns, key and item vocabularies.
    :ivar dict options: the options :func:`fit` was called with.
    """

    model: torch.nn.Module
    guide: AutoGuide
    guide_type: str
    losses: list[float]
    val_nll: list[float]
    best_epoch: int
    seconds: float
    schema: dict[str, Any]
    options: dict[str, Any]

    @property
    def efa(self) -> EFA:
        return find_efa(self.model)

    def median(self, data: EFAData) -> dict[str, torch.Tensor]:
        """Posterior median (MAP for ``"map"``) of every latent site."""
        with torch.no_grad():
            return {k: v.detach() for k, v in self.guide.median(data).items()}

    def evaluate(self, data: EFAData, **kwargs: Any) -> dict[str, float]:
        """Shortcut for :func:`evaluate`."""
        return evaluate(self, data, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Shortcut for :func:`save`."""
        save(self, path)


def _schema(data: EFAData) -> dict[str, Any]:
    return {"kind": data.kind, "columns": data.columns, "keys": data.keys, "items": data.items}


def fit(
    model: torch.nn.Module,
    data: EFAData,
    *,
    guide: str = "map",
    val_data: EFAData | None = None,
    num_epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    patience: int = 5,
    seed: int = 0,
    progress: bool = True,
    rank: int = 8,
    init_scale: float = 0.01,
    init_radius: float = 0.05,
    init_intercept: bool = True,
    num_particles: int = 1,
    eval_batch_size: int = 256,
    callback: Callable[[EFAFit], bool | None] | None = None,
) -> EFAFit:
    """Fit ``model`` to ``data`` by SVI.

    :param model: an :class:`EFA`, or a :class:`~pyro.nn.PyroModule` holding one, called as
        ``model(batch)``.
    :param EFAData data: training units.
    :param str guide: ``"map"`` (AutoDelta), ``"normal"`` (AutoNormal) or ``"lowrank"``.
    :param EFAData val_data: validation units for early stopping (plug-in NLL at the posterior
        median); without it all ``num_epochs`` run and the last state is kept.
    :param int num_epochs: maximum number of passes over the training units.
    :param int batch_size: units per step (the unit plate is subsampled and rescaled).
    :param float lr: Adam learning rate.
    :param int patience: epochs without validation improvement before stopping.
    :param int seed: seeds Pyro, torch and the batch order.
    :param bool progress: show a tqdm progress bar.
    :param bool init_intercept: start the intercepts at each key's marginal fit.
    :param callback: called after each epoch with the fit so far (current state, its
        ``losses`` and ``val_nll``); returning True stops training.
    :returns: the fit, with the best state restored.
    """
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    if batch_size < 1 or num_epochs < 1:
        raise ValueError("batch_size and num_epochs must be positive")
    if len(data) == 0 or data.num_observations == 0:
        raise ValueError("the training data has no modelled observations")
    start = time.perf_counter()
    pyro.set_rng_seed(seed)
    efa = find_efa(model)
    efa.validate(data)
    if val_data is not None:
        efa.validate(val_data)
    if init_intercept:
        efa.init_intercept(data)
    auto = make_guide(model, guide, rank=rank, init_scale=init_scale, init_radius=init_radius)
    loss_fn = Trace_ELBO(num_particles=num_particles, vectorize_particles=False)(model, auto)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_fn(next(data.batches(batch_size)))  # creates the guide's lazy parameters
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=lr)

    losses: list[float] = []
    val_hist: list[float] = []
    best = (math.inf, 0, copy.deepcopy(loss_fn.state_dict()))
    bar = tqdm(range(1, num_epochs + 1), desc=f"fit {guide}", disable=not progress, leave=False)
    step = 0
    for epoch in bar:
        model.train()
        total = 0.0
        for batch in data.batches(batch_size, shuffle=True, generator=generator):
            loss = loss_fn(batch)
            step += 1
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss.item()} at step {step} (epoch {epoch}); lower the learning "
                    "rate or check the data"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch) / data.num_units
        losses.append(total / data.num_observations)
        val = None
        fitted = EFAFit(
            model, auto, guide, losses, val_hist, epoch, time.perf_counter() - start, _schema(data), {}
        )
        if val_data is not None:
            model.eval()
            val = -float(_plugin_loglik(fitted, val_data, eval_batch_size).sum()) / val_data.num_observations
            val_hist.append(val)
            if val < best[0] - 1e-6:
                best = (val, epoch, copy.deepcopy(loss_fn.state_dict()))
            elif epoch - best[1] >= patience:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", val=f"{val:.4f}")
                break
        bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"val": f"{val:.4f}"} if val is not None else {}))
        if callback is not None and callback(fitted):
            break
    bar.close()
    best_epoch = len(losses)
    if val_data is not None:
        loss_fn.load_state_dict(best[2])
        best_epoch = best[1]
    model.eval()
    options = dict(
        guide=guide, num_epochs=num_epochs, batch_size=batch_size, lr=lr, patience=patience,
        seed=seed, rank=rank, init_scale=init_scale, init_radius=init_radius,
    )  # fmt: skip
    return EFAFit(
        model=model,
        guide=auto,
        guide_type=guide,
        losses=losses,
        val_nll=val_hist,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - start,
        schema=_schema(data),
        options=options,
    )


# ----------------------------------------------------------------------------------------------
# pointwise quantities
def _observed_sites(efa: EFA, trace: poutine.Trace) -> Iterator[tuple[int, dict]]:
    for f, name in enumerate(efa.observed_sites):
        if name in trace.nodes:
            yield f, trace.nodes[name]


def _unmask(fn: Any) -> Any:
    return fn.base_dist if isinstance(fn, MaskedDistribution) else fn


def _site_mask(site: dict) -> torch.Tensor:
    fn = site["fn"]
    return (
        fn._mask if isinstance(fn, MaskedDistribution) else torch.ones_like(site["value"], dtype=torch.bool)
    )


@torch.no_grad()
def _trace_batch(model: torch.nn.Module, batch: EFAData, values: dict[str, torch.Tensor]) -> poutine.Trace:
    conditioned = poutine.condition(model, data=values)
    return poutine.trace(conditioned).get_trace(batch)


def _plugin_loglik(fitted: EFAFit, data: EFAData, batch_size: int) -> torch.Tensor:
    efa = fitted.efa
    out = torch.zeros(data.values.shape, dtype=data.values.dtype)
    params = None
    for idx, batch in _index_batches(data, batch_size):
        if params is None:
            params = fitted.median(batch)
        tr = _trace_batch(fitted.model, batch, params)
        for _, site in _observed_sites(efa, tr):
            lp = _unmask(site["fn"]).log_prob(site["value"])
            out[idx, : lp.size(-1)] += torch.where(_site_mask(site), lp, torch.zeros_like(lp))
    return out


def _index_batches(data: EFAData, batch_size: int) -> Iterator[tuple[torch.Tensor, EFAData]]:
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        yield idx, data.subset(idx)


def log_likelihood(
    fitted: EFAFit,
    data: EFAData,
    num_samples: int = 0,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    r"""Pointwise held-out log-likelihood ``log p(x_ui | x_{c_ui})``, shape ``(U, L)``.

    With ``num_samples=0`` the embeddings are plugged in at the posterior median (MAP for
    ``"map"``). Otherwise it is the posterior predictive density estimated from ``num_samples``
    guide draws:

    .. math:: \log \frac{1}{S} \sum_s p(x_{ui} \mid x_{c_{ui}}, \theta_s).

    Entries that are not targets (context-only or padding) are 0.
    """
    was_training = fitted.model.training
    fitted.model.eval()
    try:
        if num_samples <= 0:
            return _plugin_loglik(fitted, data, batch_size)
        draws = _draw_loglik(fitted, data, num_samples, batch_size, seed)
        return torch.logsumexp(draws, 0) - math.log(num_samples)
    finally:
        fitted.model.train(was_training)


def _draw_loglik(fitted: EFAFit, data: EFAData, num_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    """``(S, U, L)`` pointwise log-likelihood under each of ``S`` guide draws."""
    efa = fitted.efa
    out = torch.zeros((num_samples, *data.values.shape), dtype=data.values.dtype)
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        batches = list(_index_batches(data, batch_size))
        for s in range(num_samples):
            with torch.no_grad():
                guide_trace = poutine.trace(fitted.guide).get_trace(batches[0][1])
            draw = {k: v["value"] for k, v in guide_trace.nodes.items() if v["type"] == "sample"}
            for idx, batch in batches:
                tr = _trace_batch(fitted.model, batch, draw)
                for _, site in _observed_sites(efa, tr):
                    lp = _unmask(site["fn"]).log_prob(site["value"])
                    out[s, idx, : lp.size(-1)] += torch.where(_site_mask(site), lp, torch.zeros_like(lp))
    return out


def _plugin_predictions(fitted: EFAFit, data: EFAData, batch_size: int) -> dict[str, torch.Tensor]:
    """Predictive mean, log base measure and family id of every target at the posterior median."""
    efa = fitted.efa
    mean = torch.full(data.values.shape, math.nan, dtype=data.values.dtype)
    prob = torch.full(data.values.shape, math.nan, dtype=data.values.dtype)
    base = torch.zeros(data.values.shape, dtype=data.values.dtype)
    params = None
    for idx, batch in _index_batches(data, batch_size):
        if params is None:
            params = fitted.median(batch)
        tr = _trace_batch(fitted.model, batch, params)
        for f, site in _observed_sites(efa, tr):
            family, fn, m = efa.families[f], _unmask(site["fn"]), _site_mask(site)
            width = m.size(-1)
            if family.natural_dim > 1:  # class probabilities: predict the most likely class
                p, c = fn.probs.max(-1)
                mean[idx, :width] = torch.where(m, c.to(mean.dtype), mean[idx, :width])
                prob[idx, :width] = torch.where(m, p, prob[idx, :width])
            else:
                mean[idx, :width] = torch.where(m, fn.mean, mean[idx, :width])
            lb = family.log_base_measure(site["value"].to(base.dtype))
            base[idx, :width] += torch.where(m, lb, torch.zeros_like(lb))
    return {"mean": mean, "prob": prob, "log_base": base}


def evaluate(
    fitted: EFAFit, data: EFAData, num_samples: int = 0, batch_size: int = 256, seed: int = 0
) -> dict[str, float]:
    """Held-out metrics per modelled observation.

    - ``nll``: mean negative log-likelihood (for categorical data: the cross-entropy in nats);
    - ``nll_no_base``: the same without the base measure ``log h(x)`` (e.g. without ``log y!``
      for counts);
    - ``mse``: mean squared error of the predictive mean (scalar families);
    - ``accuracy``: share of categorical targets whose most likely class is right.

    :param int num_samples: 0 for the plug-in posterior median, else the Monte Carlo posterior
        predictive density (``nll`` only; means are plug-in).
    """
    efa = fitted.efa
    efa.validate(data)
    targets = data.target & data.mask
    n = int(targets.sum())
    if n == 0:
        raise ValueError("no modelled observations to evaluate")
    ll = log_likelihood(fitted, data, num_samples=num_samples, batch_size=batch_size, seed=seed)
    was_training = fitted.model.training
    fitted.model.eval()
    pred = _plugin_predictions(fitted, data, batch_size)
    fitted.model.train(was_training)
    out = {
        "nll": -float(ll[targets].sum()) / n,
        "nll_no_base": -float((ll - pred["log_base"])[targets].sum()) / n,
        "num_observations": n,
    }
    categorical = targets & (efa.readout_rows.size(-1) > 1) & ~torch.isnan(pred["prob"])
    scalar = targets & ~categorical
    if scalar.any():
        out["mse"] = float(((pred["mean"] - data.values)[scalar] ** 2).mean())
    if categorical.any():
        out["accuracy"] = float((pred["mean"] == data.values)[categorical].float().mean())
    return out


def predict(fitted: EFAFit, data: EFAData, batch_size: int = 256) -> pd.DataFrame:
    """One row per modelled observation: unit, position, key, value, the predictive mean (for
    categorical values: the most likely class and its probability) and the log-likelihood."""
    efa = fitted.efa
    efa.validate(data)
    fitted.model.eval()
    pred = _plugin_predictions(fitted, data, batch_size)
    ll = log_likelihood(fitted, data, batch_size=batch_size)
    u, p = torch.nonzero(data.target & data.mask, as_tuple=True)
    table = pd.DataFrame(
        {
            "unit": [data.unit_labels[i] for i in u.tolist()],
            "position": p.numpy(),
            "key": [data.keys.labels[i] for i in data.key_index[u, p].tolist()],
            "value": data.values[u, p].numpy(),
            "prediction": pred["mean"][u, p].numpy(),
            "log_likelihood": ll[u, p].numpy(),
        }
    )
    if not torch.isnan(pred["prob"][u, p]).all():
        table["probability"] = pred["prob"][u, p].numpy()
    if data.items is not None:
        labels = data.items.labels
        table["value"] = [labels[int(i)] for i in table["value"]]
        table["prediction"] = [labels[int(i)] for i in table["prediction"]]
    return table


def posterior_predictive(
    fitted: EFAFit, data: EFAData, num_samples: int = 100, seed: int = 0
) -> torch.Tensor:
    """Draws ``(S, U, L)`` of every target from its conditional given the observed context,
    with embeddings drawn from the guide (:class:`pyro.infer.Predictive`). Non-target entries
    hold the observed values."""
    efa = fitted.efa
    fitted.model.eval()
    predictive = pyro.infer.Predictive(
        fitted.model, guide=fitted.guide, num_samples=num_samples, return_sites=efa.observed_sites
    )
    out = data.values.expand(num_samples, *data.values.shape).clone()
    fam_of_obs = efa.key_family[data.key_index]
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            draws = predictive(data, sample=True)
    for f, name in enumerate(efa.observed_sites):
        m = data.target & data.mask & (fam_of_obs == f)
        out = torch.where(m, draws[name].reshape(out.shape).to(out.dtype), out)
    return out


# ----------------------------------------------------------------------------------------------
# saving and loading
def _dummy_batch(efa: EFA, schema: dict[str, Any]) -> EFAData:
    # one unit with one observation of key 0, used to create the guide's parameters on load
    family = efa.families[int(efa.key_family[0])]
    value = torch.full((1, 1), float(family.fill_value))
    return EFAData(
        kind=efa.kind,
        key_index=torch.zeros(1, 1, dtype=torch.long),
        values=value.to(torch.get_default_dtype()),
        mask=torch.ones(1, 1, dtype=torch.bool),
        target=torch.ones(1, 1, dtype=torch.bool),
        unit_index=torch.zeros(1, dtype=torch.long),
        num_units=1,
        keys=schema["keys"],
        items=schema["items"],
        unit_labels=["<dummy>"],
        columns=schema["columns"],
    )


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(fitted: EFAFit, path: str | os.PathLike) -> None:
    """Save a fit of an :class:`EFA` model to the directory ``path``.

    Writes ``config.json`` (model configuration, guide, vocabularies, history) and
    ``params.pt`` (tensors only; loaded with ``torch.load(weights_only=True)``). Each file is
    written to a temporary name and renamed, so an interrupted save leaves the old files intact.
    """
    if not isinstance(fitted.model, EFA):
        raise TypeError("save() handles fits of an EFA model; save a larger model's state_dict yourself")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    schema = fitted.schema
    config = {
        "format": FORMAT,
        "model": fitted.model.config,
        "guide": fitted.guide_type,
        "options": fitted.options,
        "data": {
            "kind": schema["kind"],
            "columns": schema["columns"],
            "keys": schema["keys"].to_dict(),
            "items": None if schema["items"] is None else schema["items"].to_dict(),
        },
        "history": {
            "losses": fitted.losses,
            "val_nll": fitted.val_nll,
            "best_epoch": fitted.best_epoch,
            "seconds": fitted.seconds,
        },
    }
    state = {"model": fitted.model.state_dict(), "guide": fitted.guide.state_dict()}
    _atomic_write(path / "params.pt", lambda tmp: torch.save(state, tmp))
    _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def load(path: str | os.PathLike) -> EFAFit:
    """Load a fit saved by :func:`save` (no code is executed: JSON and tensors only).

    :raises ValueError: if the directory does not hold a readable fit.
    """
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} does not hold a readable pyro_efa fit (config.json: {e})") from e
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}/config.json is not a {FORMAT} file")
    try:
        state = torch.load(path / "params.pt", weights_only=True)
    except Exception as e:  # torch raises several types for damaged files
        raise ValueError(f"{path}/params.pt could not be read ({type(e).__name__}: {e})") from e
    model = EFA(**config["model"])
    d = config["data"]
    schema = {
        "kind": d["kind"],
        "columns": d["columns"],
        "keys": Vocabulary.from_dict(d["keys"]),
        "items": None if d["items"] is None else Vocabulary.from_dict(d["items"]),
    }
    options = config.get("options", {})
    guide = make_guide(model, config["guide"], rank=options.get("rank", 8))
    with torch.no_grad():
        guide(_dummy_batch(model, schema))
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{path}/params.pt does not match its config.json ({e})") from e
    model.eval()
    h = config["history"]
    return EFAFit(
        model=model,
        guide=guide,
        guide_type=config["guide"],
        losses=h["losses"],
        val_nll=h["val_nll"],
        best_epoch=h["best_epoch"],
        seconds=h["seconds"],
        schema=schema,
        options=options,
    )
