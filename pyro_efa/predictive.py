"""Held-out evaluation of a fit: pointwise log-likelihoods, metrics, predictions and
posterior predictive draws.

Each conditional ``p(x_ui | x_{c_ui})`` is scored with the embeddings plugged in at the posterior
median (the MAP for ``"map"`` guides), or averaged over guide draws (the Monte Carlo posterior
predictive density).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.distributions import MaskedDistribution
from pyro.poutine.util import site_is_subsample

from .data import EFAData
from .model import EFA

if TYPE_CHECKING:
    from .infer import EFAFit

__all__ = ["evaluate", "log_likelihood", "posterior_predictive", "predict"]


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


def _plugin_params(fitted: EFAFit) -> Callable[[EFAData], dict[str, torch.Tensor]]:
    """``params(batch)``: the posterior median of every latent site, with per-unit sites of a
    larger model (inside the unit plate) cut to the batch's units."""
    cache: dict[str, Any] = {}

    def params(batch: EFAData) -> dict[str, torch.Tensor]:
        if not cache:
            cache["median"] = fitted.median(batch)
            cache["unit_dims"] = _unit_dims(fitted)
        dims = cache["unit_dims"]
        return {
            k: v.index_select(dims[k], batch.unit_index.to(v.device)) if k in dims else v
            for k, v in cache["median"].items()
        }

    return params


def _unit_dims(fitted: EFAFit) -> dict[str, int]:
    # the dim that indexes units, for latent sites inside the unit plate
    trace = getattr(fitted.guide, "prototype_trace", None)
    units = fitted.efa.site_name("units")
    dims = {}
    for name, site in trace.nodes.items() if trace is not None else ():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name == units:
                dims[name] = frame.dim - site["fn"].event_dim
    return dims


def _plugin_loglik(fitted: EFAFit, data: EFAData, batch_size: int) -> torch.Tensor:
    efa = fitted.efa
    out = torch.zeros(data.values.shape, dtype=data.values.dtype)
    params = _plugin_params(fitted)
    for idx, batch in _index_batches(data, batch_size):
        tr = _trace_batch(fitted.model, batch, params(batch))
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
            draw = {
                k: v["value"]
                for k, v in guide_trace.nodes.items()
                if v["type"] == "sample" and not site_is_subsample(v)
            }
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
    params = _plugin_params(fitted)
    for idx, batch in _index_batches(data, batch_size):
        tr = _trace_batch(fitted.model, batch, params(batch))
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
