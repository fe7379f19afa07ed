r"""Configuration of a model and of its training, each one frozen dataclass validated in one place.

- :class:`EFAConfig`: every option of an :class:`~pyro_efa.EFA` model: its families, the
  architecture of the attention network, the embeddings, the priors, and the sizes that come from
  the data. Build a model with ``EFA.from_data(data, config, **overrides)``: the data fills the
  sizes (``kind``, ``num_keys``, ``num_items``, key features, value moments, ``max_len``) and the
  resulting complete configuration is ``model.config``, written to and read from a fit directory.
  :meth:`EFAConfig.efe` is the exponential family embedding baseline as a preset.
- :class:`FitOptions`: the options of :func:`pyro_efa.fit` that shape a fit's trajectory (epochs,
  batch size, learning rate and its decay, early stopping, seed, threads, ...).

Both check every field when they are built (a :class:`ValueError` naming the field and the
allowed values), and both have ``replace(**changes)``, ``to_dict()`` and ``from_dict()``.

Example::

    config = EFAConfig(family="poisson", direction="bi", dim=64, context_stream="fixed")
    model = EFA.from_data(train, config)             # or EFA.from_data(train, dim=64, ...)
    fitted = fit(model, train, val_data=val, lr=3e-3, batch_size=32)
    EFA(model.config)                                # the same architecture, fresh weights
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from .errors import InputError
from .families import FAMILIES

__all__ = ["EFAConfig", "FitOptions"]

KINDS = ("valued", "items")
DIRECTIONS = ("uni", "bi")
KEY_EMBEDDINGS = ("auto", "lookup", "mlp")
VALUE_EMBEDDINGS = ("mlp", "linear", "key_linear", "key_linear_std", "lookup")
CONTEXT_STREAMS = ("shared", "fixed")
ATTENTIONS = ("softmax", "uniform")
POOLS = ("mean", "sum")
ENCODINGS = ("auto", "one_pass", "per_target")

_C = TypeVar("_C", bound="_Options")


class _Options:
    """``replace``, ``to_dict`` and ``from_dict`` shared by the two configuration classes."""

    _what: ClassVar[str] = "option"

    @classmethod
    def _check_names(cls, names: Sequence[str]) -> None:
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"unknown {cls._what}(s) {unknown}; the {cls._what}s are: {', '.join(known)}")

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        self._check_names(list(changes))
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-serialisable values (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        """The configuration written by :meth:`to_dict`."""
        cls._check_names(list(d))
        return cls(**d)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _floats(value: Any) -> tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class EFAConfig(_Options):
    r"""Every option of an :class:`~pyro_efa.EFA` model.

    The model, in the names of these fields: each modelled observation ``x_i`` of a unit has

    .. math::

        p(x_i \mid x_{c_i}) = h(x_i) \exp\big(\eta_i^\top t(x_i) - A(\eta_i)\big), \qquad
        \eta_i = \mathrm{rho}[k_i]^\top z_i + b[k_i],

    with ``z_i`` the state of the attention encoder (``num_layers`` blocks of ``num_heads``
    heads of width ``head_dim``) for target ``i`` over the tokens of its context ``c_i``
    (``j < i`` for ``direction="uni"``, ``j != i`` for ``"bi"``): content tokens
    ``alpha[k_j] + g(x_j) (+ position_j)`` and the query token ``alpha[k_i] + mask (+ position_i)``.

    **Families.** ``family``: a registry name for every key, a mapping from key label to name
    (mixed types; :meth:`EFA.from_data` turns it into one name per key), a tuple with one name
    per key, or ``None`` (Gaussian for valued data). ``family_options``: options per family
    name, e.g. ``{"binomial": {"total_count": 5}, "gaussian": {"per_key": True}}``. Item
    sequences are always categorical over the items.

    **Architecture.** ``direction`` (``"uni"``: a joint likelihood; ``"bi"``: a
    pseudo-likelihood), ``dim`` (width ``d`` of tokens and embeddings), ``num_layers``,
    ``num_heads``, ``head_dim``, ``layer_norm`` and ``ff_dim`` (LayerNorm and a feed-forward block
    of that width in each layer, 0 for none), ``dropout``, ``context_stream`` (``"shared"``: the
    paper's, context tokens attend to each other; ``"fixed"``: they are never updated, exact in
    one pass), ``attention`` (``"softmax"`` or ``"uniform"``, the EFE's), ``pool`` (``"mean"``
    or ``"sum"`` over the context), ``residual``, ``project`` (value and output maps; without them
    one head reads the tokens themselves), ``attend_self`` (the query token attends to itself),
    ``position`` (a learned absolute position embedding), ``encoding`` (``"auto"``,
    ``"one_pass"`` or ``"per_target"``; see :class:`~pyro_efa.attention.EFAEncoder`),
    ``target_fraction`` (with per-target encoding, the share of each unit's targets trained on per
    step, reweighted to stay unbiased), ``exclude_context_items`` (item sequences without repeats:
    items in the context get probability 0).

    **Embeddings.** ``key_embedding``: ``"lookup"`` (a latent table ``alpha``), ``"mlp"`` (of
    numeric ``key_features``, e.g. coordinates) or ``"auto"`` (``mlp`` for keys of several numeric
    columns, else ``lookup``). ``value_embedding`` ``g``: ``"mlp"``, ``"linear"`` (``x * w``),
    ``"key_linear"`` (``x * alpha[k]``, the EFE token), ``"key_linear_std"`` (the EFE token on the
    standardised value, ``(x - value_center[k]) / value_scale[k] * alpha[k]``: with an intercept
    and every key in every context the same model class as ``key_linear``, the constant going into
    ``b``, but well conditioned for values far from 0 such as temperatures in F) or ``"lookup"`` (a
    table over the integer values ``0 .. num_value_levels - 1``). ``mlp``, ``linear`` and
    ``key_linear_std`` read ``(x - value_center[k]) / value_scale[k]``. ``standardize``:
    Gaussian-like keys (families with ``standardize = True``) predict ``value_center[k] +
    value_scale[k] * eta``, so that the network works with numbers of
    order one whatever the data's units.

    **Priors.** ``alpha``, ``rho ~ Normal(0, prior_scale)``.

    **Composition.** ``name``: prefix of every Pyro site and plate (``"efa"`` gives
    ``"efa.alpha"``, ``"efa.x"``).

    **Sizes from the data** (``None`` until :meth:`EFA.from_data` fills them): ``kind``
    (``"valued"`` or ``"items"``), ``num_keys``, ``num_items``, ``max_len`` (longest unit the
    position embedding covers), ``key_features`` (one row per key), ``value_center`` and
    ``value_scale`` (one per key), ``num_value_levels``. A configuration with ``kind`` and
    ``num_keys`` set is *complete* (:attr:`is_complete`) and builds a model with ``EFA(config)``.

    :raises ValueError: for any field outside its domain, naming it and the allowed values.
    """

    _what: ClassVar[str] = "EFA option"

    # families
    family: str | tuple[str, ...] | Mapping[Any, str] | None = None
    family_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # architecture
    direction: str = "uni"
    dim: int = 32
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    layer_norm: bool = False
    ff_dim: int = 0
    dropout: float = 0.0
    context_stream: str = "shared"
    attention: str = "softmax"
    pool: str = "mean"
    residual: bool = True
    project: bool = True
    attend_self: bool = True
    position: bool = True
    encoding: str = "auto"
    target_fraction: float = 1.0
    exclude_context_items: bool = False
    # embeddings
    key_embedding: str = "auto"
    value_embedding: str = "mlp"
    standardize: bool = True
    # priors
    prior_scale: float = 1.0
    # composition
    name: str = ""
    # sizes from the data
    kind: str | None = None
    num_keys: int | None = None
    num_items: int | None = None
    max_len: int | None = None
    key_features: tuple[tuple[float, ...], ...] | None = None
    value_center: tuple[float, ...] | None = None
    value_scale: tuple[float, ...] | None = None
    num_value_levels: int | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._check_architecture()
        self._check_families()
        if self.is_complete:
            self._check_sizes()

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def efe(cls, kind: str = "valued", **overrides: Any) -> EFAConfig:
        r"""The exponential family embedding (EFE) baseline of Rudolph et al. (2016) as a preset.

        Uniform attention over the context, no positions, no residual, identity value and output
        maps, one layer and one head, no output standardisation. For valued data
        (``kind="valued"``) the content token is ``x_j * alpha[k_j]`` (``value_embedding=
        "key_linear"``) and the context is averaged:

        .. math:: \eta_i = \mathrm{rho}[k_i]^\top \frac{1}{|c_i|} \sum_{j \in c_i} x_j\,
            \mathrm{alpha}[k_j] + b[k_i];

        for item sequences (``kind="items"``) the context items' embeddings are summed and the
        logits are ``rho @ sum_{j in c_i} alpha[item_j] + b``.

        :param str kind: ``"valued"`` or ``"items"``.
        :param overrides: other fields (``family``, ``dim``, ``direction``, ...).
        """
        _choice("kind", kind, KINDS)
        preset = dict(
            kind=kind, num_layers=1, num_heads=1, attention="uniform", project=False, residual=False,
            position=False, attend_self=False, layer_norm=False, ff_dim=0, standardize=False,
            pool="sum" if kind == "items" else "mean", value_embedding="key_linear",
        )  # fmt: skip
        cls._check_names(list(overrides))
        return cls(**{**preset, **overrides})

    # -- properties ------------------------------------------------------------------------------
    @property
    def is_complete(self) -> bool:
        """Whether the sizes from the data are set (``EFA(config)`` needs them)."""
        return self.kind is not None and self.num_keys is not None

    @property
    def family_names(self) -> tuple[str, ...]:
        """One family name per key (complete configurations)."""
        assert isinstance(self.family, tuple), "complete configurations hold one family name per key"
        return self.family

    @property
    def families_used(self) -> tuple[str, ...]:
        """The family names ``family`` gives, each once, in order (``"gaussian"`` for ``None``)."""
        family = self.family
        if family is None or isinstance(family, str):
            return (family or "gaussian",)
        return tuple(dict.fromkeys(family.values() if isinstance(family, Mapping) else family))

    # -- checks ----------------------------------------------------------------------------------
    def _normalise(self) -> None:
        # immutable, JSON-friendly forms (lists from JSON or users become tuples)
        set_ = object.__setattr__
        if isinstance(self.family, list):
            set_(self, "family", tuple(self.family))
        options = dict(self.family_options or {})
        set_(self, "family_options", {str(k): dict(v or {}) for k, v in options.items()})
        if self.key_features is not None:
            feats = self.key_features
            if isinstance(feats, torch.Tensor):
                feats = feats.tolist()
            set_(self, "key_features", tuple(_floats(row) for row in feats))
        for name in ("value_center", "value_scale"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, _floats(value))

    def _check_architecture(self) -> None:
        for name, allowed in (
            ("direction", DIRECTIONS), ("context_stream", CONTEXT_STREAMS), ("attention", ATTENTIONS),
            ("pool", POOLS), ("encoding", ENCODINGS), ("key_embedding", KEY_EMBEDDINGS),
            ("value_embedding", VALUE_EMBEDDINGS),
        ):  # fmt: skip
            _choice(name, getattr(self, name), allowed)
        for name in ("dim", "num_layers", "num_heads", "head_dim"):
            _positive_int(name, getattr(self, name))
        _positive_int("ff_dim", self.ff_dim, minimum=0)
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.target_fraction <= 1.0:
            raise InputError(f"target_fraction must be in (0, 1], got {self.target_fraction!r}")
        if not (math.isfinite(self.prior_scale) and self.prior_scale > 0):
            raise InputError(f"prior_scale must be a positive number, got {self.prior_scale!r}")
        if not self.project and self.num_heads != 1:
            raise InputError("project=False needs num_heads=1 (each head reads the tokens themselves)")
        exact = self.direction == "uni" or self.context_stream == "fixed" or self.num_layers == 1
        if self.encoding == "one_pass" and not exact:
            raise InputError(
                "encoding='one_pass' is exact only for direction='uni', context_stream='fixed' or one "
                "layer; a deeper bidirectional model with a shared context stream needs 'per_target' "
                "(or 'auto')"
            )
        if not isinstance(self.name, str):
            raise InputError(f"name must be a string, got {self.name!r}")

    def _check_families(self) -> None:
        known = ", ".join(sorted(FAMILIES))
        for name in [*self.families_used, *self.family_options]:
            if name not in FAMILIES:
                raise InputError(f"unknown family {name!r}; known families: {known}")
        for name, options in self.family_options.items():
            params = inspect.signature(FAMILIES[name].__init__).parameters
            accepted = [p for p in params if p not in ("self", "num_keys")]
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise InputError(
                    f"family_options[{name!r}]: unknown option(s) {unknown}; the {name} family takes "
                    f"{', '.join(accepted) or 'no options'}"
                )

    def _check_sizes(self) -> None:
        _choice("kind", self.kind, KINDS)
        assert self.num_keys is not None
        _positive_int("num_keys", self.num_keys)
        if self.max_len is not None:
            _positive_int("max_len", self.max_len)
        if self.kind == "items":
            if self.num_items is None:
                raise InputError("item sequences need num_items")
            _positive_int("num_items", self.num_items, minimum=2)
            if self.family not in (None, "categorical", ("categorical",)):
                raise InputError(f"item sequences are categorical over the items, got family={self.family!r}")
        else:
            if self.exclude_context_items:
                raise InputError("exclude_context_items applies to item sequences only")
            if self.family is None or isinstance(self.family, str):
                object.__setattr__(self, "family", (self.family or "gaussian",) * self.num_keys)
            if isinstance(self.family, Mapping):
                raise InputError("a family mapping (key label -> name) needs the data: use EFA.from_data")
            if isinstance(self.family, tuple) and len(self.family) != self.num_keys:
                raise InputError(f"family has {len(self.family)} entries for {self.num_keys} keys")
            for name in ("value_center", "value_scale"):
                value = getattr(self, name)
                if value is not None and len(value) != self.num_keys:
                    raise InputError(f"{name} has {len(value)} entries for {self.num_keys} keys")
            if self.value_scale is not None and not all(s > 0 for s in self.value_scale):
                raise InputError("value_scale entries must be positive")
            if self.resolved_key_embedding == "mlp":
                if self.key_features is None or len(self.key_features) != self.num_keys:
                    raise InputError("key_embedding='mlp' needs numeric key_features, one row per key")
            if self.value_embedding == "lookup":
                if self.num_value_levels is None:
                    raise InputError("value_embedding='lookup' needs num_value_levels")
                _positive_int("num_value_levels", self.num_value_levels)

    @property
    def resolved_key_embedding(self) -> str:
        """``key_embedding`` with ``"auto"`` resolved: ``"mlp"`` when the keys have numeric
        features of several columns (coordinates), else ``"lookup"``."""
        if self.key_embedding != "auto":
            return self.key_embedding
        feats = self.key_features
        return "mlp" if feats is not None and len(feats) > 0 and len(feats[0]) > 1 else "lookup"

    @property
    def one_pass_exact(self) -> bool:
        """Whether one pass computes every conditional exactly (see :mod:`pyro_efa.attention`)."""
        return self.direction == "uni" or self.context_stream == "fixed" or self.num_layers == 1

    @property
    def per_target(self) -> bool:
        """Whether the encoder re-encodes the unit once per target."""
        return self.encoding == "per_target" or (self.encoding == "auto" and not self.one_pass_exact)


@dataclasses.dataclass(frozen=True)
class FitOptions(_Options):
    """The options of :func:`pyro_efa.fit` that shape a fit's trajectory.

    :param int num_epochs: maximum number of passes over the training units.
    :param int batch_size: units per step *per process*; under ``torchrun`` the global batch is
        ``batch_size * world_size``. The unit plate is subsampled and rescaled.
    :param float lr: Adam learning rate.
    :param lr_decay: multiply the learning rate by this factor in (0, 1) when the validation NLL
        has not improved for more than ``lr_patience`` epochs in a row
        (:class:`torch.optim.lr_scheduler.ReduceLROnPlateau`; needs validation data); ``None``
        keeps it constant.
    :param int lr_patience: epochs without improvement tolerated before each reduction.
    :param int patience: epochs without validation improvement before training stops.
    :param int seed: seeds the network's initial weights, the guide's initial values (and the
        weights of a guide object's submodules with a ``reset_parameters()`` method), the batch
        order and every draw: ``fit(..., seed=s)`` alone makes a fit reproducible. Parameters
        frozen with ``requires_grad=False`` (a network fixed at an earlier fit) keep their values;
        plain ``nn.Parameter`` attributes of your own modules keep the values you gave them.
    :param bool init_network: draw the network's initial weights from ``seed`` (the default);
        ``False`` starts from the weights the model holds (a warm start, e.g. fine-tuning an earlier
        fit: the fit is then reproducible together with those weights).
    :param int num_particles: ELBO particles per step.
    :param bool init_intercept: start the intercepts at each key's marginal fit (and nuisance
        parameters such as the Gaussian scale at the residual spread).
    :param int eval_batch_size: units per batch of the validation pass.
    :param threads: torch threads while fitting (restored afterwards); ``None`` leaves torch's
        setting. The default 1 was chosen by measurement (``benchmarks/results/speed.md``): on a
        busy machine more threads make a fit several times slower, on an idle one they gain little
        for models of this size.
    :param int checkpoint_every: write a checkpoint every this many optimizer steps (0: never).
    """

    _what: ClassVar[str] = "fit option"

    num_epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    lr_decay: float | None = None
    lr_patience: int = 2
    patience: int = 5
    seed: int = 0
    init_network: bool = True
    num_particles: int = 1
    init_intercept: bool = True
    eval_batch_size: int = 256
    threads: int | None = 1
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for name in ("num_epochs", "batch_size", "num_particles", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("patience", "lr_patience", "checkpoint_every"):
            _positive_int(name, getattr(self, name), minimum=0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        if self.lr_decay is not None and not 0.0 < self.lr_decay < 1.0:
            raise InputError(f"lr_decay must be in (0, 1) or None, got {self.lr_decay!r}")
        if self.threads is not None:
            _positive_int("threads", self.threads)
