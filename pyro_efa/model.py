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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroSample, pyro_method
from torch import nn

from .attention import EFAEncoder, context_mask
from .data import EFAData
from .families import Family, get_family

__all__ = ["EFA"]

_VALUE_EMBEDDINGS = ("mlp", "linear", "key_linear", "lookup")


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
    embedding baseline); fit it with :func:`pyro_efa.fit`.

    :param str kind: ``"valued"`` or ``"items"``.
    :param int num_keys: number of keys (1 for items data).
    :param family: a family name for all keys, or a list with one family name per key.
    :param dict family_options: options per family name, e.g. ``{"binomial": {"total_count": 5}}``.
    :param int num_items: item vocabulary size (items data).
    :param key_features: ``(num_keys, F)`` numeric key features for ``key_embedding="mlp"``.
    :param int max_len: longest unit the position embedding covers.
    :param str direction: ``"uni"`` (causal; a joint likelihood) or ``"bi"`` (pseudo-likelihood).
    :param int dim: embedding width ``d``.
    :param int num_layers: attention blocks.
    :param int num_heads: heads per block.
    :param int head_dim: width of each head.
    :param str key_embedding: ``"lookup"`` (latent table ``alpha``) or ``"mlp"`` (of key features).
    :param str value_embedding: ``"mlp"``, ``"linear"`` (``x * w``), ``"key_linear"``
        (``x * alpha[k]``, the EFE token) or ``"lookup"`` (a table over integer values).
    :param int num_value_levels: table size for ``value_embedding="lookup"``.
    :param bool position: add a learned absolute position embedding.
    :param bool layer_norm: LayerNorm in each block.
    :param int ff_dim: feed-forward width in each block (0: none).
    :param str context_stream: ``"shared"`` (the paper's) or ``"fixed"``; see
        :mod:`pyro_efa.attention`.
    :param str attention: ``"softmax"`` or ``"uniform"`` (EFE).
    :param str pool: ``"mean"`` or ``"sum"`` over the context.
    :param bool residual: residual connections.
    :param bool project: value / output projections in attention.
    :param bool attend_self: the query token attends to itself.
    :param float prior_scale: standard deviation ``s`` of the Normal priors of ``alpha``, ``rho``.
    :param value_center: a number, or one per key: values are fed to ``mlp`` / ``linear``
        value embeddings as ``(x - value_center[k]) / value_scale[k]`` (:meth:`from_data` uses
        each key's mean and standard deviation, so keys of different families and scales mix).
    :param value_scale: see ``value_center``.
    :param bool standardize: Gaussian keys predict on the standardised scale: their natural
        parameter (the mean) is ``value_center[k] + value_scale[k] * (rho[k] . z + b[k])``, so
        the network and intercepts work with numbers of order one whatever the data's units
        (values near 1e8 train like values near 0). The distribution, its log-density, the
        predictions and the metrics stay in the data's units: nothing has to be undone by hand.
        :meth:`from_data` turns it on (off for :meth:`efe`, whose closed form it would change).
    :param str encoding: ``"auto"``, ``"one_pass"`` or ``"per_target"`` (see :class:`EFAEncoder`).
    :param bool exclude_context_items: items data only, opt-in: an item already in the context
        of a target gets probability 0 (its logit is set to ``-inf``). Exact for sequences that
        never repeat an item (baskets, watch histories); data that does repeat an item within a
        unit is rejected by :meth:`validate`.
    :param float target_fraction: in training with per-target encoding, the fraction of each
        unit's targets used per step (the pseudo-likelihood is reweighted to stay unbiased).
    :param float dropout: dropout in attention blocks.
    :param str name: prefix of every Pyro site and plate name (for use inside larger models).
    """

    def __init__(
        self,
        *,
        kind: str = "valued",
        num_keys: int = 1,
        family: str | Sequence[str] = "gaussian",
        family_options: Mapping[str, Mapping[str, Any]] | None = None,
        num_items: int | None = None,
        key_features: torch.Tensor | Sequence[Sequence[float]] | None = None,
        max_len: int = 512,
        direction: str = "uni",
        dim: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        head_dim: int = 16,
        key_embedding: str = "lookup",
        value_embedding: str = "mlp",
        num_value_levels: int | None = None,
        position: bool = True,
        layer_norm: bool = False,
        ff_dim: int = 0,
        context_stream: str = "shared",
        attention: str = "softmax",
        pool: str = "mean",
        residual: bool = True,
        project: bool = True,
        attend_self: bool = True,
        prior_scale: float = 1.0,
        value_center: float | Sequence[float] = 0.0,
        value_scale: float | Sequence[float] = 1.0,
        standardize: bool = False,
        encoding: str = "auto",
        target_fraction: float = 1.0,
        exclude_context_items: bool = False,
        dropout: float = 0.0,
        name: str = "",
    ) -> None:
        if kind not in ("valued", "items"):
            raise ValueError(f"kind must be 'valued' or 'items', got {kind!r}")
        if key_embedding not in ("lookup", "mlp"):
            raise ValueError(f"key_embedding must be 'lookup' or 'mlp', got {key_embedding!r}")
        if value_embedding not in _VALUE_EMBEDDINGS:
            raise ValueError(f"value_embedding must be one of {_VALUE_EMBEDDINGS}, got {value_embedding!r}")
        if attention not in ("softmax", "uniform"):
            raise ValueError(f"attention must be 'softmax' or 'uniform', got {attention!r}")
        if not 0.0 < target_fraction <= 1.0:
            raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
        if encoding not in ("auto", "one_pass", "per_target"):
            raise ValueError(f"encoding must be 'auto', 'one_pass' or 'per_target', got {encoding!r}")
        if kind == "items" and not num_items:
            raise ValueError("items data needs num_items")
        if key_embedding == "mlp" and key_features is None:
            raise ValueError("key_embedding='mlp' needs numeric key_features (one row per key)")
        if value_embedding == "lookup" and kind == "valued" and not num_value_levels:
            raise ValueError("value_embedding='lookup' needs num_value_levels")
        if prior_scale <= 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale}")
        self.kind = kind
        self.num_keys = int(num_keys)
        self.num_items = int(num_items) if num_items else None
        self.dim = int(dim)
        self.direction = direction
        self.key_embedding = key_embedding
        self.value_embedding = value_embedding if kind == "valued" else "item_lookup"
        self.use_position = bool(position)
        self.max_len = int(max_len)
        self.prior_scale = float(prior_scale)
        self.encoding = encoding
        self.target_fraction = float(target_fraction)
        if exclude_context_items and kind != "items":
            raise ValueError("exclude_context_items applies to item sequences only")
        self.exclude_context_items = bool(exclude_context_items)
        family_names = self._family_names(kind, family, self.num_keys)
        family_options = {k: dict(v) for k, v in (family_options or {}).items()}
        self.config: dict[str, Any] = {
            "kind": kind, "num_keys": self.num_keys, "family": family_names,
            "family_options": family_options, "num_items": self.num_items,
            "key_features": None if key_features is None else torch.as_tensor(key_features).tolist(),
            "max_len": self.max_len, "direction": direction, "dim": self.dim,
            "num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim,
            "key_embedding": key_embedding, "value_embedding": value_embedding,
            "num_value_levels": num_value_levels, "position": position, "layer_norm": layer_norm,
            "ff_dim": ff_dim, "context_stream": context_stream, "attention": attention, "pool": pool,
            "residual": residual, "project": project, "attend_self": attend_self,
            "prior_scale": prior_scale, "value_center": value_center, "value_scale": value_scale,
            "standardize": bool(standardize),
            "encoding": encoding, "target_fraction": target_fraction, "dropout": dropout, "name": name,
            "exclude_context_items": bool(exclude_context_items),
        }  # fmt: skip
        super().__init__(name=name)

        # -- families and the readout rows of each key ------------------------------------------
        unique = list(dict.fromkeys(family_names))
        if kind == "items":
            family_options.setdefault("categorical", {})["num_categories"] = self.num_items
        self.families = nn.ModuleList(
            get_family(f, num_keys=self.num_keys, **family_options.get(f, {})) for f in unique
        )
        self.register_buffer(
            "key_family", torch.tensor([unique.index(f) for f in family_names], dtype=torch.long)
        )
        dims = [self.families[f].natural_dim for f in self.key_family.tolist()]
        width = max(dims)
        offsets = [0, *list(torch.tensor(dims).cumsum(0).tolist())]
        rows = torch.zeros(self.num_keys, width, dtype=torch.long)
        for k, (o, nd) in enumerate(zip(offsets[:-1], dims, strict=True)):
            rows[k, :nd] = torch.arange(o, o + nd)
        self.register_buffer("readout_rows", rows)
        self.num_rows = offsets[-1]

        # -- latent embedding tables -------------------------------------------------------------
        self.register_buffer("_zero", torch.zeros(()))
        self.has_alpha = kind == "items" or key_embedding == "lookup"
        if self.has_alpha:
            num_alpha = self.num_items if kind == "items" else self.num_keys
            self.alpha = PyroSample(self._prior(num_alpha))
        self.rho = PyroSample(self._prior(self.num_rows))
        self.intercept = nn.Parameter(torch.zeros(self.num_rows))

        # -- point-estimated network -------------------------------------------------------------
        if key_embedding == "mlp":
            feats = torch.as_tensor(key_features, dtype=torch.get_default_dtype())
            center, scale = feats.mean(0), feats.std(0, unbiased=False).clamp(min=1e-6)
            self.register_buffer("key_features", (feats - center) / scale)
            self.key_mlp = nn.Sequential(nn.Linear(feats.size(-1), 64), nn.GELU(), nn.Linear(64, self.dim))
        center = torch.as_tensor(value_center, dtype=torch.get_default_dtype())
        scale = torch.as_tensor(value_scale, dtype=torch.get_default_dtype())
        self.register_buffer("value_center", center.expand(self.num_keys).clone())
        self.register_buffer("value_scale", scale.expand(self.num_keys).clone())
        # output standardisation of Gaussian keys (identity for every other key)
        self.standardize = bool(standardize) and kind == "valued"
        gauss = torch.tensor([self.families[f].name == "gaussian" for f in self.key_family.tolist()])
        on = gauss & self.standardize
        zero = torch.zeros_like(self.value_center)
        self.register_buffer("_out_center", torch.where(on, self.value_center, zero), persistent=False)
        self.register_buffer("_out_scale", torch.where(on, self.value_scale, zero + 1), persistent=False)
        if self.value_embedding == "mlp":
            self.value_net = nn.Sequential(nn.Linear(1, 32), nn.GELU(), nn.Linear(32, self.dim))
        elif self.value_embedding == "linear":
            self.value_net = nn.Linear(1, self.dim)
        elif self.value_embedding == "lookup":
            self.value_table = nn.Parameter(torch.empty(int(num_value_levels or 0), self.dim))
            _small_uniform_(self.value_table)
        if self.use_position:
            self.position = nn.Parameter(torch.empty(self.max_len, self.dim))
            _small_uniform_(self.position)
        self.mask_vector = nn.Parameter(torch.empty(self.dim))
        _small_uniform_(self.mask_vector)
        self.encoder = EFAEncoder(
            self.dim,
            num_layers=num_layers,
            direction=direction,
            context_stream=context_stream,
            attend_self=attend_self,
            num_heads=num_heads,
            head_dim=head_dim,
            layer_norm=layer_norm,
            ff_dim=ff_dim,
            uniform=attention == "uniform",
            project=project,
            residual=residual,
            pool=pool,
            dropout=dropout,
        )

    # ------------------------------------------------------------------------------------------
    # construction from data
    @classmethod
    def from_data(
        cls,
        data: EFAData,
        family: str | Mapping[Any, str] | None = None,
        **kwargs: Any,
    ) -> EFA:
        """An :class:`EFA` sized for ``data``.

        :param EFAData data: the (training) data; sizes, vocabularies and value scales come from it.
        :param family: a family name, or a mapping from key label to family name (mixed types).
            Items data is always categorical over the items.
        :param kwargs: any :class:`EFA` option.
        """
        if data.kind == "items":
            if family not in (None, "categorical"):
                raise ValueError(f"item sequences are categorical over the items, got family={family!r}")
            kwargs.update(kind="items", num_keys=1, family="categorical", num_items=len(data.items))
        else:
            names = cls._key_families(data, "gaussian" if family is None else family)
            kwargs.update(kind="valued", num_keys=len(data.keys), family=names)
            x = data.values[data.target]
            if x.numel():
                center, scale = _per_key_moments(data)
                kwargs.setdefault("value_center", center)
                kwargs.setdefault("value_scale", scale)
            kwargs.setdefault("standardize", True)
            if "categorical" in names:
                # classes from the categorical keys' values only (not other families' values)
                is_cat = torch.tensor([n == "categorical" for n in names], dtype=torch.bool)
                xc = data.values[data.target & data.mask & is_cat[data.key_index]]
                opts = kwargs.setdefault("family_options", {}).setdefault("categorical", {})
                opts.setdefault("num_categories", max(2, int(xc.max()) + 1) if xc.numel() else 2)
            if kwargs.get("value_embedding") == "lookup" and "num_value_levels" not in kwargs:
                allx = data.values[data.mask]
                if (allx < 0).any() or (allx != allx.round()).any():
                    raise ValueError("value_embedding='lookup' needs non-negative integer values")
                kwargs["num_value_levels"] = int(allx.max()) + 1
            if kwargs.get("key_embedding") is None:
                kwargs["key_embedding"] = "mlp" if len(data.columns.get("key") or []) > 1 else "lookup"
            if kwargs["key_embedding"] == "mlp":
                if data.keys.features is None:
                    raise ValueError("key_embedding='mlp' needs numeric key columns")
                kwargs["key_features"] = data.keys.features
        # room for held-out units longer than any training unit (untrained rows stay near 0)
        kwargs.setdefault("max_len", max(512, 2 * data.max_len))
        return cls(**kwargs)

    @classmethod
    def efe(cls, data: EFAData, family: str | Mapping[Any, str] | None = None, **kwargs: Any) -> EFA:
        r"""The exponential family embedding (EFE) baseline as a configuration of :class:`EFA`.

        Uniform attention over the context, no positions, no residual, identity value/output maps,
        one layer and head. For valued data the content token is ``x_j * alpha[k_j]`` and

        .. math:: \eta_i = \rho_{k_i}^\top \frac{1}{|c_i|}\sum_{j \in c_i} x_j \alpha_{k_j} + b_{k_i};

        for items the logits are ``rho @ sum_{j in c_i} alpha[item_j] + b``.
        """
        config = dict(
            num_layers=1, num_heads=1, attention="uniform", project=False, residual=False,
            position=False, attend_self=False, layer_norm=False, ff_dim=0,
            pool="sum" if data.kind == "items" else "mean", standardize=False,
        )  # fmt: skip
        if data.kind == "valued":
            config["value_embedding"] = "key_linear"
        config.update(kwargs)
        return cls.from_data(data, family=family, **config)

    @staticmethod
    def _key_families(data: EFAData, family: str | Mapping[Any, str]) -> list[str]:
        if isinstance(family, (str, Family)):
            return [family] * len(data.keys)  # type: ignore[list-item]
        names = []
        for label in data.keys.labels:
            if label not in family:
                raise ValueError(f"no family given for key {label!r}; the mapping must cover every key")
            names.append(family[label])
        return names

    @staticmethod
    def _family_names(kind: str, family: str | Sequence[str], num_keys: int) -> list[str]:
        if kind == "items":
            return ["categorical"]
        if isinstance(family, str):
            return [family] * num_keys
        names = list(family)
        if len(names) != num_keys:
            raise ValueError(f"family list has {len(names)} entries for {num_keys} keys")
        return names

    def _prior(self, rows: int) -> Any:
        def prior(self: EFA) -> dist.Distribution:
            return dist.Normal(self._zero, self.prior_scale).expand([rows, self.dim]).to_event(2)

        return prior

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
        select, weights = self._target_subset(data)
        eta = self.natural_params(data, select=select)
        return self.observe(data, eta, sample=sample, select=select, weights=weights)

    @pyro_method
    def natural_params(
        self, data: EFAData, select: torch.Tensor | None = None, mode: str | None = None
    ) -> torch.Tensor:
        """Natural parameters ``eta (B, L, D)`` of every observation given its context.

        Reads the embedding sites ``alpha`` and ``rho`` (sampled from the prior outside
        inference, from the guide inside it). Rows of context-only and padding positions are
        computed but meaningless.
        """
        self._check_batch(data)
        if select is None:  # per-target encoding computes the modelled observations only
            select = data.target & data.mask
        alpha = self.alpha if self.has_alpha else None
        rho = self.rho
        content, query = self.tokens(data, alpha)
        z = self.encoder(content, query, data.mask, mode=mode or self.encoding, select=select)
        eta = self.readout(z, data.key_index, rho)
        if self.exclude_context_items:
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
        fam_of_obs = self.key_family[data.key_index]
        out = data.values
        scale = 1.0 if weights is None else weights
        units = self.create_plates(data) if units is None else units
        with units, pyro.plate(self.site_name("positions"), data.max_len, dim=-1):
            with poutine.scale(scale=scale):
                for f, (family, site) in enumerate(zip(self.families, self.observed_sites, strict=True)):
                    m = targets & (fam_of_obs == f)
                    d = family.dist(eta[..., : family.natural_dim], data.key_index)
                    obs = None if sample else family.as_observation(family.fill(data.values, m))
                    x = pyro.sample(site, d.mask(m), obs=obs)
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
            if self.value_embedding == "key_linear":
                content = x * key
            elif self.value_embedding == "lookup":
                content = key + self.value_table[data.values.long()]
            else:
                k = data.key_index.unsqueeze(-1)
                content = key + self.value_net((x - self.value_center[k]) / self.value_scale[k])
        query = key + self.mask_vector
        if self.use_position:
            pos = self.position[:L]
            content, query = content + pos, query + pos
        return content, query

    def readout(self, z: torch.Tensor, key_index: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """``eta = rho[rows(k)] . z + b[rows(k)]``, shape ``(B, L, D)`` (for standardised
        Gaussian keys ``value_center[k] + value_scale[k] * eta``)."""
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

    def _target_subset(self, data: EFAData) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # an unbiased random subset of each unit's targets (training with per-target encoding;
        # one pass computes every target anyway, so a subset would only add variance)
        per_target = self.encoding == "per_target" or (
            self.encoding == "auto" and not self.encoder.one_pass_exact
        )
        if not self.training or self.target_fraction >= 1.0 or not per_target:
            return None, None
        targets = data.target & data.mask
        n = targets.sum(-1, keepdim=True)
        m = torch.ceil(n * self.target_fraction).clamp(min=1)
        rank = torch.rand(targets.shape, device=n.device).masked_fill(~targets, 2.0).argsort(-1).argsort(-1)
        select = targets & (rank < m)
        return select, (n / m).to(data.values.dtype).expand(targets.shape)

    def _check_batch(self, data: EFAData) -> None:
        if data.kind != self.kind:
            raise ValueError(f"model is for {self.kind!r} data, got {data.kind!r} data")
        if self.use_position and data.max_len > self.max_len:
            raise ValueError(
                f"a unit has {data.max_len} observations but the position embedding covers "
                f"{self.max_len} (build the model with a larger max_len)"
            )
        if self.kind == "valued" and data.key_index.numel() and int(data.key_index.max()) >= self.num_keys:
            raise ValueError("key index out of range: build the data with the model's key vocabulary")

    # ------------------------------------------------------------------------------------------
    # checks and initialisation (outside the constructor)
    def validate(self, data: EFAData) -> None:
        """Raise ``ValueError`` naming the unit, key and value of the first value outside the
        support of its family."""
        self._check_batch(data)
        if self.kind == "items":
            bad = data.mask & (data.values >= self.num_items)
            if bad.any():
                u, i = (int(t[0]) for t in torch.nonzero(bad, as_tuple=True))
                raise ValueError(
                    f"unit {data.unit_labels[u]!r}: item index {int(data.values[u, i])} out of range"
                )
            if self.exclude_context_items:
                seen = self._context_items(data).gather(-1, data.values.long().unsqueeze(-1)).squeeze(-1)
                bad = seen & data.mask & data.target
                if bad.any():
                    u, i = (int(t[0]) for t in torch.nonzero(bad, as_tuple=True))
                    v = int(data.values[u, i])
                    item = data.items.labels[v] if data.items is not None else v
                    raise ValueError(
                        f"unit {data.unit_labels[u]!r} repeats item {item!r}: exclude_context_items=True "
                        "gives items already in the context probability 0"
                    )
            return
        fam_of_obs = self.key_family[data.key_index]
        for f, family in enumerate(self.families):
            m = data.target & data.mask & (fam_of_obs == f)
            bad = m & family.invalid(data.values)
            if bad.any():
                u, i = (int(t[0]) for t in torch.nonzero(bad, as_tuple=True))
                key = data.keys.labels[int(data.key_index[u, i])]
                column = data.columns.get("value") or "value"
                raise ValueError(
                    f"column {column!r}: value {data.values[u, i].item()!r} of unit "
                    f"{data.unit_labels[u]!r}, key {key!r} is not valid for the {family.name} family "
                    f"({family.describe_support()}); {int(bad.sum())} such value(s) in all"
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
        for w in self.encoder.attention_weights(content, query, data.mask, mode=mode or self.encoding):
            if w.size(-1) == 2 * n:  # one pass: content columns, plus the own query token on the diagonal
                w = w[..., :n] + torch.diagonal(w[..., n:], dim1=-2, dim2=-1).diag_embed()
            maps.append(w)
        return maps


def _per_key_moments(data: EFAData) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of each key's values (all observations, context included);
    keys with fewer than two values fall back to the pooled moments."""
    m = data.mask
    keys, x = data.key_index[m], data.values[m].double()
    num_keys = len(data.keys)
    n = torch.bincount(keys, minlength=num_keys).double()
    s1 = torch.bincount(keys, weights=x, minlength=num_keys)
    s2 = torch.bincount(keys, weights=x * x, minlength=num_keys)
    mean = s1 / n.clamp(min=1)
    std = (s2 / n.clamp(min=1) - mean**2).clamp(min=0).sqrt()
    pooled_mean, pooled_std = x.mean(), x.std(unbiased=False)
    few = n < 2
    mean = torch.where(few, pooled_mean, mean)
    std = torch.where(few | (std < 1e-6), pooled_std.clamp(min=1e-6), std)
    return mean.tolist(), std.clamp(min=1e-6).tolist()


def num_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return sum(math.prod(p.shape) for p in module.parameters())
