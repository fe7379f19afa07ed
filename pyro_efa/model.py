r"""The exponential family attention model as a :class:`~pyro.nn.PyroModule`.

Generative story (unit ``u``, observation ``i``, context ``c_i``)::

    alpha ~ Normal(0, prior_scale)           context embeddings   (keys, or items)
    rho   ~ Normal(0, prior_scale)           center embeddings    (readout rows)
    for each unit u:                         pyro.plate("units", subsampled)
        for each target i of u:              pyro.plate("positions")
            z_ui  = encoder(content tokens of c_i, query token of i)
            eta_ui = rho[k_ui] . z_ui + b[k_ui]
            x_ui  ~ Family(eta_ui)

For ``direction="uni"`` (``c_i = {j < i}``) the product of the conditionals is the joint density
of the unit (chain rule), and new units can be generated ancestrally. For ``direction="bi"``
(``c_i = {j != i}``) it is a *pseudo-likelihood* (a dependency network): it is not a joint density,
and generation needs Gibbs sampling.

The embedding tables are latent sites with Normal priors (MAP under these priors is L2-regularised
maximum likelihood); the attention network, position embedding, mask vector and intercepts ``b``
are point parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroSample, pyro_method
from torch import nn

from .attention import EFAEncoder, context_mask
from .config import EFAConfig
from .data import EFAData, format_value
from .errors import InputError
from .families import FAMILIES, get_family, resolve_per_key

__all__ = ["EFA", "data_check", "find_efa"]


def _small_uniform_(t: torch.Tensor, radius: float = 0.05) -> None:
    with torch.no_grad():
        t.uniform_(-radius, radius)


class EFA(PyroModule):
    r"""Exponential family attention.

    Each modelled observation ``x_i`` of a unit has the conditional

    .. math::

        p(x_i \mid x_{c_i}) = h(x_i) \exp\big(\eta_i^\top t(x_i) - A(\eta_i)\big), \qquad
        \eta_i = \rho_{k_i}^\top z_i + b_{k_i},

    where ``z_i`` is the attention encoder's state of ``i`` computed from the query token
    ``alpha[k_i] + pos_i + mask_vector`` and the content tokens ``alpha[k_j] + pos_j + g(x_j)`` of
    its context (``g`` the value embedding). For item sequences the value is the item:
    content tokens are ``alpha[item_j] + pos_j``, and ``eta_i = rho @ z_i + b`` are the logits
    over all items.

    Build it from data with :meth:`from_data` (or :meth:`efe` for the exponential family
    embedding baseline); fit it with :func:`pyro_efa.fit`. Every option is a field of
    :class:`~pyro_efa.EFAConfig`; ``model.config`` is the complete configuration, and
    ``EFA(model.config)`` builds the same architecture again.

    :param EFAConfig config: a complete configuration (:attr:`EFAConfig.is_complete`).
    """

    def __init__(self, config: EFAConfig | None = None, **options: Any) -> None:
        if not isinstance(config, EFAConfig) or options:
            given = f"options {sorted(options)}" if options else f"a {type(config).__name__}"
            raise TypeError(
                f"EFA takes one EFAConfig, got {given}: build a model from data with "
                "EFA.from_data(data, **options), or EFA(EFAConfig(...)) from a complete configuration"
            )
        if not config.is_complete:
            raise InputError(
                "this EFAConfig has no data sizes (kind, num_keys, ...): build the model with "
                "EFA.from_data(data, config)"
            )
        self.config = config
        super().__init__(name=config.name)
        kind = config.kind
        assert config.num_keys is not None
        num_keys = config.num_keys
        names = config.family_names if kind == "valued" else ("categorical",)

        # -- families and the readout rows of each key ------------------------------------------
        unique = list(dict.fromkeys(names))
        options = {k: dict(v) for k, v in config.family_options.items()}
        if kind == "items":
            options.setdefault("categorical", {})["num_categories"] = config.num_items
        self.families = nn.ModuleList(get_family(f, num_keys=num_keys, **options.get(f, {})) for f in unique)
        self.register_buffer("key_family", torch.tensor([unique.index(f) for f in names], dtype=torch.long))
        dims = [self.families[f].natural_dim for f in self.key_family.tolist()]
        offsets = [0, *torch.tensor(dims).cumsum(0).tolist()]
        rows = torch.zeros(len(dims), max(dims), dtype=torch.long)
        for k, (o, nd) in enumerate(zip(offsets[:-1], dims, strict=True)):
            rows[k, :nd] = torch.arange(o, o + nd)
        self.register_buffer("readout_rows", rows)
        self.num_rows = offsets[-1]

        # -- latent embedding tables -------------------------------------------------------------
        self.register_buffer("_zero", torch.zeros(()))
        self.has_alpha = kind == "items" or config.resolved_key_embedding == "lookup"
        if self.has_alpha:
            self.alpha = PyroSample(self._prior(config.num_items if kind == "items" else num_keys))
        self.rho = PyroSample(self._prior(self.num_rows))
        self.intercept = nn.Parameter(torch.zeros(self.num_rows))

        # -- point-estimated network (the constructor's order of random draws is the one that
        #    reset_parameters replays) -------------------------------------------------------------
        dim = config.dim
        if kind == "valued" and config.resolved_key_embedding == "mlp":
            feats = torch.tensor(config.key_features, dtype=torch.get_default_dtype())
            center, scale = feats.mean(0), feats.std(0, unbiased=False).clamp(min=1e-6)
            self.register_buffer("key_features", (feats - center) / scale)
            self.key_mlp = nn.Sequential(nn.Linear(feats.size(-1), 64), nn.GELU(), nn.Linear(64, dim))
        self._register_value_scales(config, num_keys)
        self.value_embedding = config.value_embedding if kind == "valued" else "item_lookup"
        if self.value_embedding == "mlp":
            self.value_net = nn.Sequential(nn.Linear(1, 32), nn.GELU(), nn.Linear(32, dim))
        elif self.value_embedding == "linear":
            self.value_net = nn.Linear(1, dim)
        elif self.value_embedding == "lookup":
            self.value_table = nn.Parameter(torch.empty(int(config.num_value_levels or 0), dim))
            _small_uniform_(self.value_table)
        if config.position:
            self.position = nn.Parameter(torch.empty(self.max_len, dim))
            _small_uniform_(self.position)
        self.mask_vector = nn.Parameter(torch.empty(dim))
        _small_uniform_(self.mask_vector)
        self.encoder = EFAEncoder(config)

    def __getattr__(self, name: str) -> Any:
        # Plain network weights, buffers and submodules are read without PyroModule's per-access
        # "param" statements. Under module-local parameters (pyro_efa's setting) those statements
        # only record the parameter in a trace (their values are not used), yet each costs about
        # 20 microseconds, and reading the encoder issues one per weight: together a fifth of
        # Pyro's overhead in a training step. Latent sites (PyroSample) and PyroParams, and
        # PyroModule children (the families), keep Pyro's semantics.
        stores = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if name in stores.get(store, ()):
                value = stores[store][name]
                if not isinstance(value, PyroModule):
                    return value
        return super().__getattr__(name)

    def _register_value_scales(self, config: EFAConfig, num_keys: int) -> None:
        # value moments per key (inputs of mlp / linear value embeddings), and the output
        # standardisation of keys whose family allows it (identity for every other key)
        dtype = torch.get_default_dtype()
        center = torch.tensor(config.value_center or [0.0] * num_keys, dtype=dtype)
        scale = torch.tensor(config.value_scale or [1.0] * num_keys, dtype=dtype)
        self.register_buffer("value_center", center)
        self.register_buffer("value_scale", scale)
        self.standardize = config.standardize and config.kind == "valued"
        flags = [self.families[f].standardize for f in self.key_family.tolist()]
        on = torch.tensor(flags, dtype=torch.bool) & self.standardize
        self.register_buffer("_out_center", torch.where(on, center, 0.0), persistent=False)
        self.register_buffer("_out_scale", torch.where(on, scale, 1.0), persistent=False)

    # -- the configuration, read through -----------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"valued"`` or ``"items"``."""
        return str(self.config.kind)

    @property
    def direction(self) -> str:
        """``"uni"`` or ``"bi"``."""
        return self.config.direction

    @property
    def dim(self) -> int:
        """Embedding width ``d``."""
        return self.config.dim

    @property
    def num_keys(self) -> int:
        """Number of keys (1 for item sequences)."""
        return int(self.config.num_keys or 0)

    @property
    def num_items(self) -> int | None:
        """Item vocabulary size (item sequences)."""
        return self.config.num_items

    @property
    def max_len(self) -> int:
        """Longest unit the position embedding covers."""
        return int(self.config.max_len or 512)

    # ------------------------------------------------------------------------------------------
    # construction from data
    @classmethod
    def from_data(cls, data: EFAData, config: EFAConfig | None = None, **overrides: Any) -> EFA:
        """An :class:`EFA` sized for ``data``.

        The data fills the sizes of the configuration: ``kind``, ``num_keys`` (``num_items``),
        one family name per key (from a single name or a mapping from key label to name), the
        options families read off the data (e.g. the number of classes), the key features of a
        key MLP, each key's value moments (``value_center``, ``value_scale``), the value levels of
        a lookup value embedding and ``max_len`` (``max(512, 2 * data.max_len)``: room for
        held-out units longer than any training unit). Fields set in ``config`` or ``overrides``
        are kept.

        :param EFAData data: the (training) data.
        :param EFAConfig config: the options (default: ``EFAConfig()``).
        :param overrides: fields of :class:`EFAConfig` replacing those of ``config``.
        """
        config = (config or EFAConfig()).replace(**overrides)
        if config.kind is not None and config.kind != data.kind:
            raise InputError(f"the configuration is for {config.kind!r} data, got {data.kind!r} data")
        sizes: dict[str, Any] = {"kind": data.kind}
        if config.max_len is None:
            sizes["max_len"] = max(512, 2 * data.max_len)
        if data.kind == "items":
            if config.family not in (None, "categorical", ("categorical",)):
                raise InputError(
                    f"item sequences are categorical over the items, got family={config.family!r}"
                )
            assert data.items is not None
            sizes.update(num_keys=1, family="categorical", num_items=len(data.items))
            return cls(config.replace(**sizes))
        names = _key_families(data, config.family)
        sizes.update(num_keys=len(data.keys), family=names)
        sizes["family_options"] = _data_family_options(data, names, config.family_options)
        if data.values[data.target].numel() and (config.value_center is None or config.value_scale is None):
            center, scale = data.value_moments()
            sizes["value_center"] = config.value_center or center
            sizes["value_scale"] = config.value_scale or scale
        resolved = config.replace(key_features=data.keys.features).resolved_key_embedding
        sizes["key_embedding"] = resolved
        if resolved == "mlp" and config.key_features is None:
            if data.keys.features is None:
                raise InputError("key_embedding='mlp' needs numeric key columns")
            sizes["key_features"] = data.keys.features
        if config.value_embedding == "lookup" and config.num_value_levels is None:
            sizes["num_value_levels"] = _value_levels(data)
        return cls(config.replace(**sizes))

    @classmethod
    def efe(cls, data: EFAData, **overrides: Any) -> EFA:
        r"""The exponential family embedding (EFE) baseline: :meth:`from_data` with the preset
        :meth:`EFAConfig.efe` for the kind of ``data``; ``overrides`` replace its fields."""
        return cls.from_data(data, EFAConfig.efe(data.kind), **overrides)

    def _prior(self, rows: int) -> Any:
        # one distribution object per device and dtype, built once (not at every step)
        cache: dict[tuple[torch.device, torch.dtype], dist.Distribution] = {}

        def prior(self: EFA) -> dist.Distribution:
            key = (self._zero.device, self._zero.dtype)
            if key not in cache:
                normal = dist.Normal(self._zero, self.config.prior_scale)
                cache[key] = normal.expand([rows, self.dim]).to_event(2)
            return cache[key]

        return prior

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the network's initial weights again, in the constructor's order of random draws
        (so that ``pyro.set_rng_seed(s)`` then ``reset_parameters()`` gives the weights a model
        built right after ``pyro.set_rng_seed(s)`` has), and set intercepts and nuisance parameters
        back to their initial values. :func:`pyro_efa.fit` calls it after seeding."""
        for family in self.families:
            family.reset_parameters()
        self.intercept.zero_()
        if hasattr(self, "key_mlp"):
            _reset_modules(self.key_mlp)
        if hasattr(self, "value_net"):
            _reset_modules(self.value_net)
        if hasattr(self, "value_table"):
            _small_uniform_(self.value_table)
        if self.config.position:
            _small_uniform_(self.position)
        _small_uniform_(self.mask_vector)
        _reset_modules(self.encoder)

    # ------------------------------------------------------------------------------------------
    # names and plates
    def site_name(self, name: str) -> str:
        """Full Pyro site name of ``name`` under this module's prefix."""
        # not _pyro_get_fullname: it asserts that the module has run once (observed_sites must
        # work on a freshly built model); _pyro_name is already the full prefix
        prefix = self.__dict__["_pyro_name"]
        return f"{prefix}.{name}" if prefix else name

    @property
    def observed_sites(self) -> list[str]:
        """Names of the observed sites, one per family."""
        if len(self.families) == 1:
            return [self.site_name("x")]
        return [self.site_name(f"x_{f.name}") for f in self.families]

    def create_plates(self, data: EFAData, *args: Any, **kwargs: Any) -> pyro.plate:
        """The unit plate for ``data`` (a subsample of ``data.num_units``), at ``dim=-2``.

        Pass it to autoguides as ``create_plates`` so that guides of per-unit latent variables
        subsample the same units as the model.
        """
        return pyro.plate(self.site_name("units"), data.num_units, subsample=data.unit_index, dim=-2)

    # ------------------------------------------------------------------------------------------
    # the generative story
    def forward(self, data: EFAData, sample: bool = False) -> torch.Tensor:
        """Score (or, with ``sample=True``, draw) every target of ``data`` given its context.

        :param EFAData data: a batch of units.
        :param bool sample: draw the targets instead of observing them; contexts still use the
            observed values (posterior predictive of each conditional).
        :returns: ``(B, L)`` the observed or drawn values.
        """
        select, weights = self.target_subset(data)
        eta = self.natural_params(data, select=select)
        return self.observe(data, eta, sample=sample, select=select, weights=weights)

    @pyro_method
    def natural_params(
        self, data: EFAData, select: torch.Tensor | None = None, mode: str | None = None
    ) -> torch.Tensor:
        """Natural parameters ``eta (B, L, D)`` of every observation given its context.

        Reads the embedding sites ``alpha`` and ``rho`` (sampled from the prior outside
        inference, from the guide inside it). Rows of context-only and padding positions are
        computed but meaningless. ``data`` is expected to have passed :meth:`validate` (every
        fitting and scoring function of the library checks it once, not per batch).

        :param ~torch.Tensor select: ``(B, L)`` targets to compute with per-target encoding
            (default: every modelled observation).
        :param str mode: encoder mode (default: the configuration's ``encoding``).
        """
        self._check_batch(data)
        if select is None:  # per-target encoding computes the modelled observations only
            select = data.target & data.mask
        alpha = self.alpha if self.has_alpha else None
        rho = self.rho  # both sites before the encoder: the order of draws is part of a seeded fit
        content, query = self.tokens(data, alpha)
        z = self.encoder(content, query, data.mask, mode=mode, select=select)
        eta = self.readout(z, data.key_index, rho)
        if self.config.exclude_context_items:
            eta = eta.masked_fill(self._context_items(data), -math.inf)
        return eta

    @pyro_method
    def observe(
        self,
        data: EFAData,
        eta: torch.Tensor,
        sample: bool = False,
        select: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        units: pyro.plate | None = None,
    ) -> torch.Tensor:
        """The observation sites: ``x_ui ~ Family(eta_ui)`` for every target, in the unit plate.

        Each site keeps its natural parameters in its ``infer`` dict (``site["infer"]["eta"]``),
        so that a trace of a larger model shows the ``eta`` it passed here.

        :param ~torch.Tensor eta: ``(B, L, D)`` natural parameters (from :meth:`natural_params`,
            possibly modified by a larger model).
        :param ~torch.Tensor select: optional ``(B, L)`` subset of targets to score.
        :param ~torch.Tensor weights: optional ``(B, L)`` log-likelihood weights.
        :param units: the unit plate from :meth:`create_plates`, when the calling model already
            opened it (a subsampled plate may be created only once per model run).
        """
        targets = data.target & data.mask
        if select is not None:
            targets = targets & select
        several = len(self.families) > 1
        fam_of_obs = self.key_family[data.key_index] if several else None
        out = data.values
        units = self.create_plates(data) if units is None else units
        # the positions plate declares independence only: without a size it needs no subsample
        # statement at every step (the batch fixes its size)
        with units, pyro.plate(self.site_name("positions"), dim=-1):
            with poutine.scale(scale=weights) if weights is not None else contextlib.nullcontext():
                for f, (family, site) in enumerate(zip(self.families, self.observed_sites, strict=True)):
                    m = targets & (fam_of_obs == f) if several else targets
                    e = eta[..., : family.natural_dim]
                    d = family.dist(e, data.key_index).mask(m)
                    obs = None if sample else family.as_observation(family.fill(data.values, m))
                    x = pyro.sample(site, d, obs=obs, infer={"eta": e})
                    if sample:
                        out = torch.where(m, x.to(out.dtype), out)
        return out

    # ------------------------------------------------------------------------------------------
    # pieces
    def tokens(self, data: EFAData, alpha: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Content tokens (key and value) and query tokens (key and mask vector), ``(B, L, d)``."""
        B, L = data.key_index.shape
        if self.kind == "items":
            key = torch.zeros(B, L, self.dim, dtype=data.values.dtype, device=data.values.device)
            assert alpha is not None
            content = alpha[data.values.long()]
        else:
            key = (
                alpha[data.key_index]
                if alpha is not None
                else self.key_mlp(self.key_features)[data.key_index]
            )
            x = data.values.unsqueeze(-1)
            k = data.key_index.unsqueeze(-1)
            if self.value_embedding == "key_linear":
                content = x * key
            elif self.value_embedding == "key_linear_std":
                content = (x - self.value_center[k]) / self.value_scale[k] * key
            elif self.value_embedding == "lookup":
                content = key + self.value_table[data.values.long()]
            else:
                content = key + self.value_net((x - self.value_center[k]) / self.value_scale[k])
        query = key + self.mask_vector
        if self.config.position:
            pos = self.position[:L]
            content, query = content + pos, query + pos
        return content, query

    def readout(self, z: torch.Tensor, key_index: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """``eta = rho[rows(k)] . z + b[rows(k)]``, shape ``(B, L, D)`` (for standardised keys
        ``value_center[k] + value_scale[k] * eta``)."""
        if self.kind == "items":
            return z @ rho.transpose(-1, -2) + self.intercept
        rows = self.readout_rows[key_index]
        if rows.size(-1) == 1:
            r = rows.squeeze(-1)
            eta = (rho[r] * z).sum(-1) + self.intercept[r]
            if self.standardize:
                eta = self._out_center[key_index] + self._out_scale[key_index] * eta
            return eta.unsqueeze(-1)
        eta = (z @ rho.transpose(-1, -2) + self.intercept).gather(-1, rows)
        if self.standardize:
            first = self._out_center[key_index] + self._out_scale[key_index] * eta[..., 0]
            eta = torch.cat([first.unsqueeze(-1), eta[..., 1:]], -1)
        return eta

    def _context_items(self, data: EFAData) -> torch.Tensor:
        """``(B, L, V)``: True where item ``v`` is among the context items of target ``i``."""
        ctx = context_mask(data.mask, self.direction).to(data.values.dtype)  # (B, L, L)
        onehot = torch.nn.functional.one_hot(data.values.long(), self.num_items).to(ctx.dtype)
        return (ctx @ onehot) > 0

    def target_subset(self, data: EFAData) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The targets to train on in this step and their log-likelihood weights.

        With per-target encoding and ``config.target_fraction < 1``, in training mode: a random
        ``ceil(n * target_fraction)`` of each unit's ``n`` targets, weighted ``n / m`` so that the
        log likelihood stays unbiased. Otherwise ``(None, None)``: every target, weight 1. A
        larger model that composes :meth:`natural_params` and :meth:`observe` passes both on::

            select, weights = efa.target_subset(data)
            eta = efa.natural_params(data, select=select) + other_term
            efa.observe(data, eta, select=select, weights=weights)

        :returns: ``select (B, L)`` and ``weights (B, L)``, or ``(None, None)``.
        """
        # one pass computes every target anyway, so a subset would only add variance
        if not self.training or self.config.target_fraction >= 1.0 or not self.config.per_target:
            return None, None
        targets = data.target & data.mask
        n = targets.sum(-1, keepdim=True)
        m = torch.ceil(n * self.config.target_fraction).clamp(min=1)
        rank = torch.rand(targets.shape, device=n.device).masked_fill(~targets, 2.0).argsort(-1).argsort(-1)
        select = targets & (rank < m)
        # a unit without targets (context rows only: n = 0) selects nothing; its weight is 1, not
        # 0 / 1 (Pyro refuses a scale of 0)
        weight = torch.where(n > 0, n / m, torch.ones_like(m))
        return select, weight.to(data.values.dtype).expand(targets.shape)

    def _check_batch(self, data: EFAData) -> None:
        # cheap checks of every batch (Python numbers only: no device synchronisation)
        if data.kind != self.kind:
            raise InputError(f"model is for {self.kind!r} data, got {data.kind!r} data")
        if self.config.position and data.max_len > self.max_len:
            raise InputError(
                f"a unit has {data.max_len} observations but the position embedding covers "
                f"{self.max_len} (build the model with a larger max_len)"
            )

    # ------------------------------------------------------------------------------------------
    # checks and initialisation (outside the constructor)
    def validate(self, data: EFAData) -> None:
        """Check ``data`` against the model before any use: its kind and lengths, its key or item
        indices, the support of each target's family, the levels of a lookup value embedding and
        the no-repeat constraint of ``exclude_context_items``.

        :raises ValueError: naming the unit, key and value of the first offending observation and
            how many there are.
        """
        self._check_batch(data)
        real = data.mask
        if self.kind == "items":
            self._refuse(
                data,
                real & (data.values >= self.num_items),
                f"is not one of the model's {self.num_items} items",
            )
            if self.config.exclude_context_items:
                v = data.values.long().unsqueeze(-1)
                seen = self._context_items(data).gather(-1, v).squeeze(-1) & real & data.target
                self._refuse(
                    data, seen, "is already in its context: exclude_context_items=True gives items "
                    "already in the context probability 0, so it needs units that never repeat an item",
                )  # fmt: skip
            return
        self._refuse(data, real & (data.key_index >= self.num_keys), "has a key outside the model's keys")
        fam_of_obs = self.key_family[data.key_index.clamp(max=self.num_keys - 1)]
        for f, family in enumerate(self.families):
            bad = data.target & real & (fam_of_obs == f) & family.invalid(data.values)
            self._refuse(
                data, bad, f"is not valid for the {family.name} family ({family.describe_support()})"
            )
        if self.value_embedding == "lookup":
            levels = self.value_table.size(0)
            x = data.values
            bad = real & ((x != x.round()) | (x < 0) | (x >= levels))
            self._refuse(
                data, bad, f"cannot be looked up in the value embedding's table (value_embedding="
                f"'lookup': integers 0..{levels - 1}, the levels seen in training)",
            )  # fmt: skip

    @staticmethod
    def _refuse(data: EFAData, bad: torch.Tensor, why: str) -> None:
        if not bad.any():
            return
        u, i = (int(t[0]) for t in torch.nonzero(bad, as_tuple=True))
        column = data.columns.get("value") or (data.columns.get("key") or ["value"])[0]
        value = data.values[u, i].item()
        if data.kind == "items":
            labels = data.items.labels if data.items is not None else None
            what = (
                f"item {labels[int(value)]!r}"
                if labels and int(value) < len(labels)
                else f"item index {int(value)}"
            )
        else:
            key = (
                data.keys.labels[int(data.key_index[u, i])]
                if int(data.key_index[u, i]) < len(data.keys)
                else "?"
            )
            what = f"value {format_value(value, data.values.dtype)} (key {key!r})"
        raise InputError(
            f"column {column!r}: {what} of unit {data.unit_labels[u]!r} {why}; {int(bad.sum())} such "
            "observation(s) in all"
        )

    @torch.no_grad()
    def init_intercept(self, data: EFAData) -> None:
        """Set the intercepts ``b`` to the best constant fit of each key's values (items: the
        log frequencies), so that training starts from the marginal model, and the families'
        nuisance parameters (e.g. the Gaussian scale) from the residuals of that fit."""
        if self.kind == "items":
            counts = torch.bincount(data.values[data.target & data.mask].long(), minlength=self.num_items)
            self.intercept.copy_(torch.log((counts + 1.0) / (counts.sum() + self.num_items)))
            return
        keys = data.key_index[data.target & data.mask]
        vals = data.values[data.target & data.mask]
        residual = torch.zeros_like(vals)
        for k in torch.unique(keys).tolist():
            family = self.families[int(self.key_family[k])]
            rows = self.readout_rows[k, : family.natural_dim]
            here = keys == k
            eta = family.initial_eta(vals[here]).to(self.intercept.dtype)
            eta[0] = (eta[0] - self._out_center[k]) / self._out_scale[k]  # standardised keys
            self.intercept[rows] = eta
            residual[here] = vals[here] - vals[here].mean()  # around the constant fit's mean
        fam_of_obs = self.key_family[keys]
        for f, family in enumerate(self.families):
            here = fam_of_obs == f
            family.init_nuisance(residual[here], keys[here])

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, direction={self.direction!r}, dim={self.dim}, keys={self.num_keys}"

    @pyro_method
    def attention_maps(self, data: EFAData, mode: str | None = None) -> list[torch.Tensor]:
        """Attention weights of each target over its context, one ``(B, heads, L, L)`` tensor
        per layer (rows: targets ``i``; columns: positions ``j`` of the unit).

        Entry ``[b, h, i, j]`` for ``j != i`` is the weight that target ``i``'s query stream
        gives to position ``j`` (nonzero only for ``j`` in its context ``c_i``). The weight of
        the query's own token (its key and the mask vector; or, in later layers, its own state)
        is folded into the **diagonal** ``[b, h, i, i]``: ``x_i`` itself is never attended to, so
        the diagonal holds no value information. Each row of a real observation with something
        to attend to sums to 1; padding rows are 0.

        Reads the embedding site ``alpha`` like :meth:`natural_params`: call it under
        ``poutine.condition`` with the fitted values (e.g. :meth:`~pyro_efa.EFAFit.median`).

        :param EFAData data: a batch of units.
        :param str mode: encoder mode (default: the model's ``encoding``); see
            :meth:`~pyro_efa.attention.EFAEncoder.attention_weights`.
        :rtype: list[~torch.Tensor]
        """
        self._check_batch(data)
        alpha = self.alpha if self.has_alpha else None
        content, query = self.tokens(data, alpha)
        maps = []
        n = data.max_len
        for w in self.encoder.attention_weights(content, query, data.mask, mode=mode):
            if w.size(-1) == 2 * n:  # one pass: content columns, plus the own query token on the diagonal
                w = w[..., :n] + torch.diagonal(w[..., n:], dim1=-2, dim2=-1).diag_embed()
            maps.append(w)
        return maps


def find_efa(model: torch.nn.Module) -> EFA:
    """The :class:`EFA` inside ``model`` (``model`` itself if it is one)."""
    for module in model.modules():
        if isinstance(module, EFA):
            return module
    raise TypeError(f"{type(model).__name__} holds no EFA module")


def data_check(model: torch.nn.Module) -> Callable[[EFAData], None]:
    """The check every fitting and scoring function runs on data before using ``model``: the
    model's own ``validate(data)`` when it defines one (a composed model with needs of its own
    calls :meth:`EFA.validate` from it), else that of the :class:`EFA` inside it."""
    own = getattr(model, "validate", None)
    return own if callable(own) else find_efa(model).validate


def reset_parameters(model: torch.nn.Module, skip: torch.nn.Module | None = None) -> None:
    """Draw the initial weights of ``model`` again from the current random state: every
    :class:`EFA` inside it by :meth:`EFA.reset_parameters`, every other submodule with a
    ``reset_parameters()`` method (``nn.Linear``, ``nn.LayerNorm``, ...) by that method, in
    module order. Plain ``nn.Parameter`` attributes of a larger model are left as they are.

    :param skip: a module whose submodules are left alone (a guide that holds the model).
    """
    skip_ids: set[int] = {id(m) for m in skip.modules()} if skip is not None else set()
    for module in model.modules():
        if id(module) in skip_ids:
            continue
        if isinstance(module, EFA):
            module.reset_parameters()
            skip_ids.update(id(m) for m in module.modules())
        elif module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _reset_modules(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(module, "reset_parameters") and not isinstance(module, (nn.Sequential, EFAEncoder)):
        module.reset_parameters()


def _key_families(data: EFAData, family: str | tuple[str, ...] | Mapping[Any, str] | None) -> tuple[str, ...]:
    """One family name per key of ``data``."""
    if family is None or isinstance(family, str):
        return (family or "gaussian",) * len(data.keys)
    if isinstance(family, tuple):
        if len(family) != len(data.keys):
            raise InputError(f"family has {len(family)} entries for the {len(data.keys)} keys of the data")
        return family
    missing = [label for label in data.keys.labels if label not in family]
    if missing:
        raise InputError(
            f"no family given for key(s) {missing[:5]}; the mapping must cover every key of the data"
        )
    return tuple(family[label] for label in data.keys.labels)


def _data_family_options(
    data: EFAData, names: tuple[str, ...], given: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``given`` completed by what each family reads off the values of its keys (a value given
    by the user wins), and ``per_key="auto"`` (given, or a family's default) resolved from the
    number of training observations of each of its keys (:func:`~pyro_efa.families.resolve_per_key`).
    Keys with class labels must have a family of class labels."""
    for label in data.classes:
        family = FAMILIES[names[data.keys.labels.index(label)]]
        if not family.predicts_class:
            shown = data.classes[label].labels[:3]
            raise InputError(
                f"key {label!r} holds class labels (e.g. {shown}); give it a family of class labels, "
                f"e.g. family={{{label!r}: 'categorical', ...}} (it has {family.name!r})"
            )
    out = {k: dict(v) for k, v in given.items()}
    in_family = torch.tensor([[n == f for n in names] for f in dict.fromkeys(names)], dtype=torch.bool)
    sizes = [len(data.classes[k]) if k in data.classes else None for k in data.keys.labels]
    observed = data.key_index[data.target & data.mask].cpu()
    counts = torch.bincount(observed, minlength=len(data.keys))[: len(data.keys)]  # per key
    for f, name in enumerate(dict.fromkeys(names)):
        x = data.values[data.target & data.mask & in_family[f][data.key_index]]
        mine = [c if n == name else None for c, n in zip(sizes, names, strict=True)]
        found = FAMILIES[name].options_from_data(x, mine)
        if found:
            out[name] = {**found, **out.get(name, {})}
        per_key = resolve_per_key(FAMILIES[name], out.get(name, {}).get("per_key"), counts[in_family[f]])
        if per_key is not None:
            out.setdefault(name, {})["per_key"] = per_key
    return out


def _value_levels(data: EFAData) -> int:
    """Table size of a lookup value embedding: the values must be integers 0, 1, 2, ..."""
    x = data.values[data.mask]
    if (x < 0).any() or (x != x.round()).any():
        raise InputError("value_embedding='lookup' needs non-negative integer values")
    return int(x.max()) + 1
