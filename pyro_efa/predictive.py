r"""Held-out evaluation of a fit: pointwise log-likelihoods, metrics, predictions and posterior
predictive draws, all computed by the one scoring path (:mod:`pyro_efa.scoring`).

Each conditional ``p(x_ui | x_{c_ui})`` is scored with the latent values plugged in (the
posterior median of Normal-based guides, the MAP for ``"map"``), or averaged over guide draws
(the Monte Carlo posterior predictive density).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from .data import EFAData
from .errors import InputError
from .scoring import Scorer, log_base_measure, seeded

if TYPE_CHECKING:
    from .results import EFAFit

__all__ = ["evaluate", "log_likelihood", "posterior_predictive", "predict"]


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


def _metrics(fitted: EFAFit, data: EFAData, loglik: torch.Tensor, prediction: torch.Tensor) -> dict[str, Any]:
    efa = fitted.efa
    targets = data.target & data.mask
    n = int(targets.sum())
    base = log_base_measure(efa, data)
    out: dict[str, Any] = {
        "nll": -float(loglik[targets].sum()) / n,
        "nll_no_base": -float((loglik - base)[targets].sum()) / n,
        "num_observations": n,
    }
    predicts_class = torch.tensor([f.predicts_class for f in efa.families])[efa.key_family.cpu()]
    labels = targets & predicts_class[data.key_index]
    scalar = targets & ~labels
    if scalar.any():
        out["mse"] = float(((prediction - data.values)[scalar] ** 2).mean())
    if labels.any():
        out["accuracy"] = float((prediction == data.values)[labels].float().mean())
    return out


def evaluate(
    fitted: EFAFit, data: EFAData, num_samples: int = 0, batch_size: int = 256, seed: int = 0
) -> dict[str, Any]:
    """Held-out metrics per modelled observation.

    - ``nll``: mean negative log-likelihood (for categorical data: the cross-entropy in nats);
    - ``nll_no_base``: the same without the base measure ``log h(x)`` (e.g. without ``log y!``
      for counts);
    - ``mse``: mean squared error of the point prediction (families that do not predict class
      labels);
    - ``accuracy``: share of class-label targets whose most likely class is right.

    The plug-in values give everything in one pass over the data.

    :param int num_samples: 0 for the plug-in values, else ``nll`` and ``nll_no_base`` are the
        Monte Carlo posterior predictive density from ``num_samples`` guide draws (one pass per
        draw); the point predictions stay plug-in.
    """
    scorer = Scorer(fitted, data, batch_size)
    if (data.target & data.mask).sum() == 0:
        raise InputError("no modelled observations to evaluate")
    scores = scorer.score(scorer.latents(plug_in=True))
    loglik = scores.loglik if num_samples <= 0 else _mc_loglik(scorer, num_samples, seed)
    return _metrics(fitted, scorer.source, loglik.cpu(), scores.prediction.cpu())


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
