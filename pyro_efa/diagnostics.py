r"""Posterior diagnostics and model criticism with ArviZ.

This is the only module of :mod:`pyro_efa` that imports ArviZ (``pip install pyro-efa[diagnostics]``);
every conversion to ArviZ lives here, so a move to ArviZ 1.x (where ``az.InferenceData`` becomes an
``xarray.DataTree`` built by ``arviz_base.from_dict``) touches this file only.

- :func:`to_inference_data`: guide draws of the embeddings, the pointwise log-likelihood of every
  held-out target, posterior predictive draws and the observed values, as ``az.InferenceData``.
- :func:`compare`: ``az.compare`` of several fits on the same data.
- :func:`pit`, :func:`plot_pit`, :func:`plot_ppc`: calibration and posterior predictive checks,
  one panel per family.
- :func:`embedding_summary`, :func:`natural_param_draws`: summaries of the embedding posterior
  and draws of the (identifiable) natural parameters.
- :func:`plot_attention`: the attention maps of one unit, one panel per layer and head.

**What the draws mean.** Only the embedding tables (and any other latent site of the model) are
drawn from the guide; the attention network is a point estimate. With the ``"map"`` guide there
is a single draw (the MAP), marked ``attrs["point_estimate"] = 1``.

**R-hat.** Draws of one guide are independent by construction, so R-hat over them is about 1 and
says nothing about convergence. Several *independent fits* (different seeds) can be stacked as
chains (``chains=``); R-hat across them measures how stable the fit is, but only for identifiable
quantities: natural parameters (``include_eta=True`` or :func:`natural_param_draws`),
predictions, products of embeddings that the invertible-linear-map ambiguity leaves unchanged.
Raw embedding coordinates differ between fits by such a map (about 2.8 has been measured), so
their R-hat is large even for two equally good fits; align them first
(:func:`pyro_efa.embeddings.align_embeddings`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import matplotlib.ticker
import numpy as np
import pandas as pd
import torch
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pyro import poutine

from .data import EFAData
from .errors import InputError
from .results import EFAFit
from .scoring import Latents, Scorer, eval_mode, seeded

with warnings.catch_warnings():
    # arviz 0.x announces its 1.x refactor with a FutureWarning once a day on import
    warnings.filterwarnings(
        "ignore", message=r"(?s).*ArviZ is undergoing a major refactor", category=FutureWarning
    )
    import arviz as az

__all__ = [
    "compare",
    "embedding_summary",
    "natural_param_draws",
    "pit",
    "plot_attention",
    "plot_pit",
    "plot_ppc",
    "to_inference_data",
]


# ----------------------------------------------------------------------------------------------
# draws of one fit, all through the scoring path
def _latent_draws(scorer: Scorer, num_samples: int) -> list[Latents]:
    """The guide's draws: one (the point) for a point estimate, else ``num_samples``, all made
    before any scoring (the draws of :func:`pyro_efa.log_likelihood` with the same seed)."""
    if scorer.fit.point_estimate:
        return [scorer.latents(plug_in=True)]
    return scorer.latent_draws(num_samples)


def _predictive_draws(scorer: Scorer, latents: list[Latents], num_samples: int) -> torch.Tensor:
    """``(S, U, L)`` posterior predictive draws: one per latent draw, or ``num_samples`` from the
    one point of a point estimate."""
    if len(latents) == 1 and num_samples > 1:
        latents = latents * num_samples
    return torch.stack([scorer.score(x, sample=True).draw for x in latents]).cpu()  # type: ignore[misc]


def _check_chains(fits: Sequence[EFAFit]) -> None:
    kinds = {f.guide_name for f in fits}
    if len(kinds) > 1:
        raise InputError(f"all chains must come from the same guide, got {sorted(kinds)}")
    configs = {repr(f.efa.config) for f in fits}
    if len(configs) > 1:
        raise InputError("all chains must be fits of the same model configuration")


# ----------------------------------------------------------------------------------------------
# labels and dims
def _label_array(labels: Sequence[Hashable]) -> np.ndarray:
    """Labels as a NumPy array that xarray and netCDF can store (tuples become strings)."""
    labels = list(labels)
    if all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in labels):
        return np.asarray(labels, dtype=np.int64)
    if all(isinstance(x, str) for x in labels):
        return np.asarray(labels, dtype=str)
    if all(isinstance(x, numbers.Real) for x in labels):
        return np.asarray(labels, dtype=np.float64)
    return np.asarray([str(x) for x in labels], dtype=str)


def _embedding_dims(fitted: EFAFit) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Named dims and coords of the embedding tables ``alpha`` and ``rho``."""
    efa, schema = fitted.efa, fitted.schema
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {"latent": np.arange(efa.dim)}
    rows_name = "item" if efa.kind == "items" else "key"
    if efa.kind == "items":
        coords["item"] = _label_array(schema["items"].labels)
    else:
        coords["key"] = _label_array(schema["keys"].labels)
    # (no hasattr(efa, "alpha"): reading a PyroSample attribute draws from the prior)
    dims[efa.site_name("alpha")] = [rows_name, "latent"]
    if efa.kind == "items" or efa.num_rows == efa.num_keys:
        dims[efa.site_name("rho")] = [rows_name, "latent"]
    else:
        # several readout rows for keys with a vector natural parameter (categorical values)
        labels = []
        for k, label in enumerate(schema["keys"].labels):
            width = efa.families[int(efa.key_family[k])].natural_dim
            labels += [str(label)] if width == 1 else [f"{label}:{c}" for c in range(width)]
        coords["readout_row"] = np.asarray(labels, dtype=str)
        dims[efa.site_name("rho")] = ["readout_row", "latent"]
    return dims, coords


def _targets(data: EFAData) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit and position of every modelled observation, in row-major order (the ``obs`` dim)."""
    return torch.nonzero(data.target & data.mask, as_tuple=True)


def _family_names(fitted: EFAFit, data: EFAData, u: torch.Tensor, p: torch.Tensor) -> np.ndarray:
    efa = fitted.efa
    names = [f.name for f in efa.families]
    return np.asarray([names[i] for i in efa.key_family[data.key_index[u, p]].tolist()], dtype=str)


def _observation_values(fitted: EFAFit, x: np.ndarray) -> np.ndarray:
    # integers for all-discrete models (ArviZ then draws histograms, not KDEs)
    if all(f.is_discrete for f in fitted.efa.families):
        return np.rint(x).astype(np.int64)
    return x.astype(np.float64)


# ----------------------------------------------------------------------------------------------
def to_inference_data(
    fit: EFAFit,
    data: EFAData,
    num_samples: int = 200,
    seed: int = 0,
    chains: Sequence[EFAFit] | None = None,
    *,
    batch_size: int = 256,
    include_eta: bool = False,
) -> az.InferenceData:
    r"""Guide draws, pointwise log-likelihood and posterior predictive draws as ``az.InferenceData``.

    With ``S`` draws ``theta_s`` of the latent sites from the guide and ``N`` modelled
    observations ``x_n`` of ``data`` (its targets, flattened in unit-then-position order: the
    ``obs`` dim), the groups are

    - ``posterior``: every latent site, ``(chain, draw, ...)``. The embedding tables have named
      dims: ``alpha`` ``("key", "latent")`` (``("item", "latent")`` for item sequences), ``rho``
      the same or ``("readout_row", "latent")`` when a key has a vector natural parameter; with
      ``include_eta``, also ``eta`` ``("obs",)`` or ``("obs", "natural")``. Per-unit latent
      sites of a larger model have a ``unit`` dim (their plate's) labelled with the unit labels;
      the guide draws them for ``data.unit_index``, so they mean something only for the units
      the guide was fitted on.
    - ``log_likelihood``: ``x`` ``(chain, draw, obs)`` float64,

      .. math:: \mathrm{x}[s, n] = \log p(x_n \mid x_{c_n}, \theta_s);

      its sum over ``obs`` is the held-out total of :func:`pyro_efa.log_likelihood` (with the
      MAP: exactly; its ``logsumexp`` over draws minus ``log S`` is
      ``log_likelihood(fit, data, num_samples=S, seed=seed)``).
    - ``posterior_predictive``: ``x`` ``(chain, draw, obs)``, one draw of every target from its
      conditional given the *observed* context, under ``theta_s``.
    - ``observed_data``: ``x`` ``(obs,)``; ``constant_data``: ``unit_index`` (row of ``data``),
      ``key_index``, ``position`` and ``family`` of each observation. The obs-level groups carry
      the non-dimension coords ``unit`` and ``key`` (the labels).

    ``x`` holds integers when every family is discrete (item ids for item sequences).

    The ``"map"`` guide gives one draw (``attrs["point_estimate"] = 1``; netCDF cannot store
    booleans); its ``posterior_predictive`` still holds ``num_samples`` draws of the plug-in
    conditionals (``attrs["posterior_predictive"] = "plug-in"``), so that predictive checks
    work. PSIS-LOO and WAIC need draws and are not available for it.

    **Chains.** ``chains`` are further independent fits (other seeds) of the same model to the
    same training data; they are stacked after ``fit`` along ``chain`` (chain ``c`` is drawn
    with seed ``seed + c``). R-hat over the draws of one guide is about 1 by construction and
    means nothing. Across independent fits it measures the stability of the fit, and only for
    identifiable quantities: natural parameters (``include_eta=True``), predictions, products of
    the embeddings invariant to an invertible linear map. Raw embedding coordinates differ
    between fits by such a map, so their R-hat is large even for equally good fits.

    :param EFAFit fit: the fit (any guide).
    :param EFAData data: the data to score, usually held out, built with the fit's vocabularies.
    :param int num_samples: guide draws ``S`` per chain (predictive draws for ``"map"``).
    :param int seed: seeds the guide and predictive draws; the global RNG state is restored.
    :param chains: further independent fits, one chain each.
    :param int batch_size: units per model evaluation.
    :param bool include_eta: add the natural parameters of every observation to ``posterior``.
    :rtype: ~arviz.InferenceData
    """
    fits = [fit, *(chains or [])]
    _check_chains(fits)
    data = data.conform(fit.schema)  # the fit's vocabularies, whatever the data was built with
    if num_samples < 1:
        raise InputError(f"num_samples must be positive, got {num_samples}")
    u, p = _targets(data)
    if u.numel() == 0:
        raise InputError("the data has no modelled observations")
    chain_draws = [
        _chain(f, data, num_samples, seed + c, batch_size, include_eta) for c, f in enumerate(fits)
    ]
    point = fit.point_estimate
    attrs = {
        "guide": fit.guide_name,
        "point_estimate": int(point),
        "num_fits": len(fits),
        "chains": "independent fits" if len(fits) > 1 else "one fit",
        "posterior_predictive": "plug-in" if point else "guide draws",
        "inference_library": "pyro_efa",
    }
    return az.InferenceData(attrs=attrs, **_groups(fit, data, chain_draws, attrs))


def _groups(
    fit: EFAFit, data: EFAData, chain_draws: Sequence[Mapping[str, Any]], attrs: Mapping[str, Any]
) -> dict[str, xr.Dataset]:
    """The groups of :func:`to_inference_data` from the draws of each chain."""
    u, p = _targets(data)
    posterior = {k: np.stack([d["posterior"][k] for d in chain_draws]) for k in chain_draws[0]["posterior"]}
    dims, coords = _posterior_dims(fit, data, chain_draws[0]["units"], posterior)
    coords["obs"] = np.arange(u.numel())
    obs_dims = {name: ["obs"] for name in ("x", "unit_index", "key_index", "position", "family")}

    def dataset(values: Mapping[str, Any], default_dims: list[str] | None = None) -> xr.Dataset:
        return az.dict_to_dataset(
            dict(values),
            coords=coords,
            dims={**dims, **obs_dims},
            default_dims=default_dims,
            attrs=dict(attrs),
        )

    groups = {
        "posterior": dataset(posterior),
        "log_likelihood": dataset({"x": np.stack([d["loglik"] for d in chain_draws])}),
        "posterior_predictive": dataset({"x": np.stack([d["predictive"] for d in chain_draws])}),
        "observed_data": dataset({"x": _observation_values(fit, data.values[u, p].numpy())}, []),
        "constant_data": dataset(
            {
                "unit_index": u.numpy(),
                "key_index": data.key_index[u, p].numpy(),
                "position": p.numpy(),
                "family": _family_names(fit, data, u, p),
            },
            [],
        ),
    }
    labels = {
        "unit": ("obs", _label_array([data.unit_labels[i] for i in u.tolist()])),
        "key": ("obs", _label_array([data.keys.labels[i] for i in data.key_index[u, p].tolist()])),
    }
    for name in ("log_likelihood", "posterior_predictive", "observed_data", "constant_data"):
        groups[name] = groups[name].assign_coords(labels)
    return groups


def _chain(
    fit: EFAFit, data: EFAData, num_samples: int, seed: int, batch_size: int, include_eta: bool
) -> dict[str, Any]:
    """One chain of :func:`to_inference_data`: the guide's draws first (as
    :func:`pyro_efa.log_likelihood` makes them), then one scoring pass per draw giving the
    log-likelihood, a posterior predictive draw and the natural parameters."""
    u, p = _targets(data)
    scorer = Scorer(fit, data, batch_size)
    with seeded(seed):
        draws = _latent_draws(scorer, num_samples)
        scores = [scorer.score(x, sample=True, eta=include_eta) for x in draws]
        if fit.point_estimate:  # one point: num_samples predictive draws of its conditionals
            predictive = _predictive_draws(scorer, draws, num_samples)
        else:
            predictive = torch.stack([s.draw for s in scores]).cpu()  # type: ignore[misc]
    posterior = {k: torch.stack([d.values[k] for d in draws]).double().cpu().numpy() for k in draws[0].values}
    if include_eta:
        e = torch.stack([s.eta for s in scores]).cpu()[:, u, p].double().numpy()  # type: ignore[misc]
        posterior["eta"] = e[..., 0] if e.shape[-1] == 1 else e
    return {
        "posterior": posterior,
        "units": {k: dim for k, (dim, _) in draws[0].units.items()},
        "loglik": torch.stack([s.loglik for s in scores]).cpu()[:, u, p].double().numpy(),
        "predictive": _observation_values(fit, predictive[:, u, p].numpy()),
    }


def _posterior_dims(
    fit: EFAFit, data: EFAData, unit_dims: Mapping[str, int], posterior: Mapping[str, np.ndarray]
) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Named dims of the posterior group: embedding tables, per-unit sites (their unit plate's
    dim named ``unit``), the natural parameters."""
    dims, coords = _embedding_dims(fit)
    dims = {k: v for k, v in dims.items() if k in posterior}
    for name, dim in unit_dims.items():
        rank = posterior[name].ndim - 2  # (chain, draw, ...)
        dims[name] = [f"{name}_dim_{i}" for i in range(rank)]
        dims[name][rank + dim] = "unit"
        coords["unit"] = _label_array(data.unit_labels)
    if "eta" in posterior:
        dims["eta"] = ["obs"] if posterior["eta"].ndim == 3 else ["obs", "natural"]
    return dims, coords


def natural_param_draws(
    fit: EFAFit,
    data: EFAData,
    num_samples: int = 200,
    seed: int = 0,
    *,
    samples: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    r"""Draws of the natural parameters ``eta (S, U, L, D)`` of every target of ``data``.

    .. math:: \eta_s = \eta(x_{c}, \theta_s), \qquad \theta_s \sim q(\theta)

    with the latent values ``theta_s`` drawn from the guide (one draw for a point estimate), or
    taken from ``samples`` (e.g. ``pyro.infer.MCMC.get_samples()``: site name to ``(S, ...)``
    tensor). It is the ``eta`` the model passes to its observation sites (for a larger model,
    after its own terms). The natural parameters are identifiable (unlike embedding coordinates),
    so they are the quantity to compare between guides, MCMC, and independent fits (R-hat across
    fits). Entries of context-only and padding positions are NaN.

    :param EFAFit fit: the fit (its network is used as is).
    :param EFAData data: units.
    :param int num_samples: number of guide draws (ignored with ``samples``).
    :param int seed: seeds the guide draws; the global random state is restored.
    :param samples: posterior samples of the latent sites to use instead of the guide.
    :param int batch_size: units per model evaluation.
    """
    scorer = Scorer(fit, data, batch_size)
    if samples is not None:
        n = {v.size(0) for v in samples.values()}
        if len(n) != 1:
            raise InputError(f"all samples need the same number of draws, got sizes {sorted(n)}")
        draws = [Latents({k: v[s] for k, v in samples.items()}, {}) for s in range(n.pop())]
    else:
        with seeded(seed):
            draws = _latent_draws(scorer, num_samples)
    return torch.stack([scorer.score(x, eta=True).eta for x in draws]).cpu()  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
def compare(
    fits: Mapping[str, EFAFit],
    data: EFAData,
    num_samples: int = 200,
    seed: int = 0,
    *,
    ic: str = "loo",
    **kwargs: Any,
) -> pd.DataFrame:
    """``az.compare`` of several fits on the same data (usually held out), ranked by ``ic``.

    Each fit is converted with :func:`to_inference_data` (``num_samples`` guide draws). Note:

    - the log-likelihood terms are *conditionals* ``log p(x_i | x_{c_i})``; for a bidirectional
      model their sum is a pseudo-likelihood, and PSIS-LOO / WAIC on such terms is heuristic
      (expect many Pareto k > 0.7 warnings);
    - on held-out data the posterior never saw the observations, so the plain log pointwise
      predictive density (:func:`pyro_efa.evaluate` with ``num_samples``) is already an
      out-of-sample estimate; LOO and WAIC subtract an effective-parameter penalty on top. Use
      the held-out log-likelihood as the primary comparison and this table as a secondary one;
    - point estimates (``"map"``) have no draws and cannot be compared this way.

    :param dict fits: model name to fit.
    :param EFAData data: the data all fits are scored on.
    :param str ic: ``"loo"`` or ``"waic"``.
    :param kwargs: passed to :func:`arviz.compare` (``method``, ``scale``, ...).
    :returns: ArviZ's comparison table, best model first.
    """
    if len(fits) < 2:
        raise InputError("compare needs at least two fits")
    point = [name for name, f in fits.items() if f.point_estimate]
    if point:
        raise InputError(
            f"fit(s) {point} are point estimates (guide='map') with a single draw; LOO/WAIC need "
            "posterior draws (fit with guide='normal' or 'lowrank'), or compare held-out "
            "log-likelihoods with pyro_efa.evaluate"
        )
    idata = {name: to_inference_data(f, data, num_samples=num_samples, seed=seed) for name, f in fits.items()}
    return az.compare(idata, ic=ic, **kwargs)


# ----------------------------------------------------------------------------------------------
def _randomized_pit(x: np.ndarray, draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r"""Randomized PIT of observations ``x (N,)`` against predictive draws ``(S, N)``.

    With ``r`` the rank of ``x`` among the ``S + 1`` values ``{x, draws}`` (ties broken at
    random) and ``v ~ U(0, 1)``,

    .. math:: u = \frac{r + v}{S + 1},

    which is exactly ``U(0, 1)`` when ``x`` and the draws are exchangeable (a calibrated
    predictive), for discrete and continuous values alike.
    """
    S = draws.shape[0]
    below = (draws < x).sum(0)
    ties = (draws == x).sum(0)
    r = below + rng.integers(0, ties + 1)
    return (r + rng.random(x.shape)) / (S + 1)


def pit(
    fit: EFAFit, data: EFAData, num_samples: int = 200, seed: int = 0, *, batch_size: int = 256
) -> np.ndarray:
    """Randomized probability integral transform of every modelled observation of ``data``.

    The predictive CDF of each target given its observed context is estimated from
    ``num_samples`` posterior predictive draws (one guide draw each; the MAP for ``"map"``) and
    evaluated at the observed value, with ties (discrete families) broken at random, so that a
    calibrated model gives exactly uniform values. For categorical values the CDF uses the order
    of the class indices, which is arbitrary: uniformity still holds for a calibrated model, but
    the shape of a deviation is not interpretable.

    :returns: ``(N,)`` values in ``(0, 1)`` in the ``obs`` order of :func:`to_inference_data`
        (families: ``idata.constant_data["family"]``).
    """
    data = data.conform(fit.schema)
    u, p = _targets(data)
    scorer = Scorer(fit, data, batch_size)
    with seeded(seed):
        pp = _predictive_draws(scorer, _latent_draws(scorer, num_samples), num_samples)
    x = data.values[u, p].double().numpy()
    return _randomized_pit(x, pp[:, u, p].double().numpy(), np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------------
# figures (no pyplot: figures are plain matplotlib Figure objects, safe under any backend)
def _grid(
    n: int, ncols: int | None = None, size: tuple[float, float] = (4.0, 3.0)
) -> tuple[Figure, list[Axes]]:
    ncols = ncols or min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_ppc(
    idata: az.InferenceData, family: str | None = None, num_pp_samples: int | None = 50, **kwargs: Any
) -> Figure:
    """Posterior predictive check (``az.plot_ppc``) of ``x``, one panel per family.

    :param idata: from :func:`to_inference_data`.
    :param str family: only this family (default: every family in the data).
    :param int num_pp_samples: predictive draws to plot.
    :param kwargs: passed to :func:`arviz.plot_ppc` (``kind``, ``mean``, ...).
    """
    fam = idata.constant_data["family"].values
    names = [family] if family is not None else list(dict.fromkeys(fam.tolist()))
    if family is not None and family not in fam:
        raise InputError(f"no observation of family {family!r}; the data has {sorted(set(fam.tolist()))}")
    draws = idata.posterior_predictive.sizes["chain"] * idata.posterior_predictive.sizes["draw"]
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=True):
        obs = np.flatnonzero(fam == name)
        with warnings.catch_warnings():
            # arviz 0.23's KDE plot uses an API that matplotlib 3.11 deprecates
            warnings.filterwarnings("ignore", message="Passing a dict or None as alias_mapping")
            az.plot_ppc(
                idata,
                var_names=["x"],
                coords={"obs": obs},
                num_pp_samples=min(num_pp_samples or draws, draws),
                random_seed=0,
                ax=ax,
                **kwargs,
            )
        ax.set_title(f"{name} ({obs.size} observations)")
    return fig


def plot_pit(
    pit_values: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None, bins: int = 20
) -> Figure:
    """Histograms of PIT values with the uniform density and its pointwise 99% band.

    A calibrated model gives a flat histogram; a U shape means an under-dispersed predictive,
    a hump an over-dispersed one, a slope a biased one.

    :param pit_values: ``(N,)`` values from :func:`pit`.
    :param groups: optional ``(N,)`` label per value (e.g. ``idata.constant_data["family"]``);
        one panel per label.
    :param int bins: histogram bins.
    """
    values = np.asarray(pit_values, dtype=np.float64)
    labels = np.full(values.shape, "all", dtype=object) if groups is None else np.asarray(groups)
    names = list(dict.fromkeys(labels.tolist()))
    fig, axes = _grid(len(names))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, name in zip(axes, names, strict=True):
        v = values[labels == name]
        n = v.size
        # a count per bin is Binomial(n, 1/bins); its normal 99% band, as a density
        half = 2.576 * math.sqrt(n * (1 / bins) * (1 - 1 / bins)) * bins / max(n, 1)
        ax.axhspan(max(0.0, 1 - half), 1 + half, color="0.85", label="99% band (uniform)")
        ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.7, label="PIT")
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel("PIT")
        ax.set_ylabel("density")
        ax.set_title(f"{name} ({n} observations)")
        ax.legend(loc="lower center", fontsize="small")
    return fig


# ----------------------------------------------------------------------------------------------
def embedding_summary(
    idata: az.InferenceData, var_names: Sequence[str] | None = None, kind: str | None = None, **kwargs: Any
) -> pd.DataFrame:
    """``az.summary`` of the embedding tables (the posterior variables with a ``latent`` dim).

    :param kind: ``"stats"`` (mean, sd, HDI) by default for one chain, whose draws are
        independent guide draws (R-hat and ESS are meaningless there); ``"all"`` for several
        chains. Across independent fits the raw coordinates are not comparable (see the module
        docstring): align them before reading R-hat.
    :param kwargs: passed to :func:`arviz.summary`.
    """
    if var_names is None:
        var_names = [k for k, v in idata.posterior.data_vars.items() if "latent" in v.dims]
    if kind is None:
        kind = "all" if idata.posterior.sizes["chain"] > 1 else "stats"
    return az.summary(idata, var_names=list(var_names), kind=kind, **kwargs)


def plot_attention(
    fit: EFAFit, data: EFAData, unit: Hashable, *, cmap: str = "viridis", panel_size: float = 3.0
) -> Figure:
    """Attention maps of one unit at the posterior median (the MAP for ``"map"``).

    One panel per layer (rows of the figure) and head (columns). In each panel row ``i`` is a
    target of the unit and column ``j`` a position of the unit; entry ``(i, j)`` is the weight
    that target ``i``'s query gives to position ``j`` (see :meth:`pyro_efa.EFA.attention_maps`:
    the diagonal holds the query's weight on its own token, which carries its key but not its
    value). Rows and columns are labelled with the keys (items: the position, and the item of
    each context position).

    :param EFAFit fit: the fit.
    :param EFAData data: data holding the unit.
    :param unit: the unit's label (as in ``data.unit_labels``).
    """
    if unit not in data.unit_labels:
        raise InputError(f"unit {unit!r} is not in the data")
    data = data.conform(fit.schema)
    row = data.unit_labels.index(unit)
    one = data.subset([row])
    efa = fit.efa
    with torch.no_grad(), eval_mode(fit.model), poutine.condition(data=fit.median(one)):
        maps = efa.attention_maps(one)
    n = int(one.mask[0].sum())
    targets = torch.nonzero(one.target[0, :n]).squeeze(-1).tolist()
    keys = [str(data.keys.labels[k]) for k in one.key_index[0, :n].tolist()]
    if efa.kind == "items":
        assert data.items is not None
        columns = [f"{j}: {data.items.labels[int(v)]}" for j, v in enumerate(one.values[0, :n].tolist())]
        rows = [f"{i}" for i in targets]
    else:
        columns = [f"{j}: {k}" for j, k in enumerate(keys)]
        rows = [f"{i}: {keys[i]}" for i in targets]
    heads = maps[0].size(1)
    fig = Figure(
        figsize=(panel_size * heads + 1, panel_size * len(maps)),
        layout="constrained",
    )
    axes = fig.subplots(len(maps), heads, squeeze=False)
    for layer, w in enumerate(maps):
        for h in range(heads):
            ax = axes[layer, h]
            image = ax.imshow(w[0, h, targets, :n].numpy(), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
            ax.set_title(f"layer {layer + 1}, head {h + 1}")
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(range(n)))
            ax.set_xticklabels(columns, rotation=90, fontsize="small")
            ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(range(len(targets))))
            ax.set_yticklabels(rows, fontsize="small")
            ax.set_xlabel("context position")
            ax.set_ylabel("target")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(f"attention of unit {unit!r}")
    return fig
