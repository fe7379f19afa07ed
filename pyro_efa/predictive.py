r"""Held-out evaluation of a fit: pointwise log-likelihoods, metrics, predictions and posterior
predictive draws, all computed by the one scoring path (:mod:`pyro_efa.scoring`).

Each conditional ``p(x_ui | x_{c_ui})`` is scored with the latent values plugged in (the
posterior median of Normal-based guides, the MAP for ``"map"``), or averaged over guide draws
(the Monte Carlo posterior predictive density).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .data import EFAData
from .errors import InputError
from .scoring import Scorer, Scores, log_base_measure, seeded

if TYPE_CHECKING:
    from .results import EFAFit

__all__ = ["evaluate", "interval_coverage", "log_likelihood", "posterior_predictive", "predict"]


def _mc_loglik(scorer: Scorer, num_samples: int, seed: int) -> torch.Tensor:
    """``log (1/S) sum_s p(x | context, theta_s)`` of every observation (guide draws first, then
    scoring; seeded, the global random state restored)."""
    with seeded(seed):
        draws = scorer.latent_draws(num_samples)
        stacked = torch.stack([scorer.score(latents).loglik for latents in draws])
    return torch.logsumexp(stacked, 0) - math.log(num_samples)


def log_likelihood(
    fitted: EFAFit, data: EFAData, num_samples: int = 0, batch_size: int = 256, seed: int = 0
) -> torch.Tensor:
    r"""Pointwise held-out log-likelihood ``log p(x_ui | x_{c_ui})``, shape ``(U, L)``.

    With ``num_samples=0`` the latent values are plugged in (posterior median; MAP for
    ``"map"``). Otherwise it is the posterior predictive density estimated from ``num_samples``
    guide draws:

    .. math:: \log \frac{1}{S} \sum_s p(x_{ui} \mid x_{c_{ui}}, \theta_s).

    Entries that are not targets (context-only or padding) are 0.
    """
    scorer = Scorer(fitted, data, batch_size)
    if num_samples <= 0:
        return scorer.score(scorer.latents(plug_in=True)).loglik.cpu()
    return _mc_loglik(scorer, num_samples, seed).cpu()


def _metric_frame(fitted: EFAFit, data: EFAData, scores: Scores, loglik: torch.Tensor) -> pd.DataFrame:
    """One row per target: its key, site (family), log-likelihood, ``log h(x)``, squared error
    (families without class labels) or hit (class labels), and rank (NaN where not defined)."""
    efa = fitted.efa
    u, p = torch.nonzero(data.target & data.mask, as_tuple=True)
    key = data.key_index[u, p]
    site = efa.key_family.cpu()[key]
    predicts_class = torch.tensor([f.predicts_class for f in efa.families])[site]
    x = data.values[u, p].double()
    prediction = scores.prediction.cpu()[u, p].double()
    nan = torch.full_like(x, float("nan"))
    return pd.DataFrame(
        {
            "key": key.numpy(),
            "site": site.numpy(),
            "loglik": loglik[u, p].double().numpy(),
            "base": log_base_measure(efa, data)[u, p].double().numpy(),
            "squared_error": torch.where(predicts_class, nan, (prediction - x) ** 2).numpy(),
            "hit": torch.where(predicts_class, (prediction == x).double(), nan).numpy(),
            "rank": scores.rank.cpu()[u, p].double().numpy(),
        }
    )


def _summary(frame: pd.DataFrame, k: int) -> dict[str, Any]:
    """The metrics of the targets in ``frame`` (rows of :func:`_metric_frame`)."""
    out: dict[str, Any] = {
        "num_observations": len(frame),
        "nll": -float(frame["loglik"].mean()),
        "nll_no_base": -float((frame["loglik"] - frame["base"]).mean()),
    }
    if frame["squared_error"].notna().any():
        out["mse"] = float(frame["squared_error"].mean())
    if frame["hit"].notna().any():
        out["accuracy"] = float(frame["hit"].mean())
    rank = frame["rank"].dropna().to_numpy()
    if rank.size:
        top = rank <= k
        out[f"recall@{k}"] = float(top.mean())
        out[f"ndcg@{k}"] = float(np.where(top, 1.0 / np.log2(rank + 1.0), 0.0).mean())
    return out


def _metrics(fitted: EFAFit, data: EFAData, scores: Scores, loglik: torch.Tensor, k: int) -> dict[str, Any]:
    """Pooled metrics, then one record per observed site and one per key."""
    efa, frame = fitted.efa, _metric_frame(fitted, data, scores, loglik)
    sites, names = efa.observed_sites, [f.name for f in efa.families]
    per_site = [
        {"site": sites[s], "family": names[s], **_summary(rows, k)} for s, rows in frame.groupby("site")
    ]
    family_of_key = efa.key_family.tolist()
    per_key = [
        {"key": data.keys.labels[key], "family": names[family_of_key[key]], **_summary(rows, k)}
        for key, rows in frame.groupby("key")
    ]
    return {**_summary(frame, k), "per_site": per_site, "per_key": per_key}


def evaluate(
    fitted: EFAFit, data: EFAData, num_samples: int = 0, batch_size: int = 256, seed: int = 0, k: int = 10
) -> dict[str, Any]:
    """Held-out metrics per modelled observation.

    - ``nll``: mean negative log-likelihood (for categorical data: the cross-entropy in nats);
    - ``nll_no_base``: the same without the base measure ``log h(x)`` (e.g. without ``log y!``
      for counts);
    - ``mse``: mean squared error of the point prediction, in the data's units (families that
      do not predict class labels);
    - ``accuracy``: share of class-label targets whose most likely class is right;
    - ``recall@k`` and ``ndcg@k`` (class labels and items; ``k`` = 10 by default): share of
      targets whose observed class ranks among the ``k`` most likely, and the normalised
      discounted cumulative gain with one relevant class, ``1 / log2(1 + rank)`` when
      ``rank <= k`` else 0, averaged over targets (the numbers sequential recommenders report);
    - ``num_observations``: the number of targets.

    The same metrics per observed site (one per family: ``per_site``) and per key (``per_key``,
    each a list of records with the ``site`` or ``key`` label and ``family``;
    ``pandas.DataFrame(metrics["per_key"])`` gives a table): for mixed-type data the MSE of each
    key in its own units and the NLL of each key beside the pooled ones. The plug-in values give
    everything in one pass over the data.

    :param int num_samples: 0 for the plug-in values, else ``nll`` and ``nll_no_base`` are the
        Monte Carlo posterior predictive density from ``num_samples`` guide draws (one pass per
        draw); the point predictions and ranks stay plug-in.
    :param int k: the cut-off of ``recall@k`` and ``ndcg@k``.
    """
    if int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    scorer = Scorer(fitted, data, batch_size)
    if (data.target & data.mask).sum() == 0:
        raise InputError("no modelled observations to evaluate")
    scores = scorer.score(scorer.latents(plug_in=True))
    loglik = scores.loglik if num_samples <= 0 else _mc_loglik(scorer, num_samples, seed)
    return _metrics(fitted, scorer.source, scores, loglik.cpu(), int(k))


def predict(fitted: EFAFit, data: EFAData, batch_size: int = 256) -> pd.DataFrame:
    """One row per modelled observation: unit, position, key, value, the point prediction (for
    class labels: the most likely class and its probability) and the log-likelihood, at the
    plug-in values, from one pass over the data."""
    scorer = Scorer(fitted, data, batch_size)
    data = scorer.source  # in the fit's vocabularies
    scores = scorer.score(scorer.latents(plug_in=True))
    prediction, probability, loglik = (
        t.cpu() for t in (scores.prediction, scores.probability, scores.loglik)
    )
    u, p = torch.nonzero(data.target & data.mask, as_tuple=True)
    table = pd.DataFrame(
        {
            "unit": [data.unit_labels[i] for i in u.tolist()],
            "position": p.numpy(),
            "key": [data.keys.labels[i] for i in data.key_index[u, p].tolist()],
            "value": data.values[u, p].numpy(),
            "prediction": prediction[u, p].numpy(),
            "log_likelihood": loglik[u, p].numpy(),
        }
    )
    if not torch.isnan(probability[u, p]).all():
        table["probability"] = probability[u, p].numpy()
    if data.items is not None:
        labels = data.items.labels
        table["value"] = [labels[int(i)] for i in table["value"]]
        table["prediction"] = [labels[int(i)] for i in table["prediction"]]
    return data.class_labels(table, ("value", "prediction")) if data.classes else table


def posterior_predictive(
    fitted: EFAFit, data: EFAData, num_samples: int = 100, seed: int = 0, batch_size: int = 256
) -> torch.Tensor:
    """Draws ``(S, U, L)`` of every target from its conditional given the *observed* context,
    each with its own guide draw of the latent values (one draw for point estimates: the
    plug-in values). Non-target entries hold the observed values."""
    scorer = Scorer(fitted, data, batch_size)
    with seeded(seed):
        if fitted.point_estimate:
            latents = [scorer.latents(plug_in=True)] * num_samples
        else:
            latents = scorer.latent_draws(num_samples)
        draws = [scorer.score(x, sample=True).draw for x in latents]
    return torch.stack([d.cpu() for d in draws if d is not None])


def interval_coverage(
    fitted: EFAFit, data: EFAData, level: float = 0.9, num_samples: int = 200, seed: int = 0
) -> float:
    """Share of the targets of ``data`` inside their central ``level`` posterior-predictive
    interval: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``num_samples`` draws of
    :func:`posterior_predictive`, bounds included. For discrete values with few levels it can
    exceed ``level`` whatever the model (an interval holds whole values); a categorical family's
    draws are class indices, so its interval follows the order of its classes.

    :param float level: in (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise InputError(f"level must be in (0, 1), got {level!r}")
    draws = posterior_predictive(fitted, data, num_samples=num_samples, seed=seed)
    lo = torch.quantile(draws.double(), (1 - level) / 2, dim=0)
    hi = torch.quantile(draws.double(), (1 + level) / 2, dim=0)
    m = data.target & data.mask
    values = data.values.double()
    inside = (values >= lo) & (values <= hi)
    return float(inside[m].double().mean())
