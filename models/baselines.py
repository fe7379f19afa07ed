r"""Count baselines of the item-sequence experiments (MovieLens items, Instacart).

**What is scored.** Exactly EFA's held-out metric: the mean over the targets of a split (the
positions where ``data.target & data.mask``; context-only observations feed contexts but are not
scored) of :math:`-\log p(x_{ui} \mid x_{c_{ui}})` in nats, the number
``pyro_efa.evaluate(fitted, test)["nll"]`` reports for EFA. The context ``c_ui`` of position ``i``
of unit ``u`` is that of :func:`pyro_efa.attention.context_mask`: every earlier observation of the
unit (``uni``; the first has none), or every other observation of the unit (``bi``). Every
probability is over all ``n`` items of the training vocabulary (the context items are candidates
too), and the held-out splits are put in the training vocabulary first, as EFA's scoring does.

**Baselines** (training statistics from the training units only, hyperparameters chosen on the
validation units only, from the small grids below; the first grid point wins a tie):

- :func:`popularity` (both directions): ``pop[v] = (counts.item[v] + alpha) / (N + alpha * n)``,
  the add-``alpha`` training frequency of item ``v`` (``N`` training targets).
- :func:`markov` (``uni``): ``p(v | w) = (counts.transition[w, v] + alpha * pop[v]) /
  (counts.transition[w].sum() + alpha)`` given the previous observation ``w``; the first target of a
  unit gets ``(counts.first[v] + alpha_first * pop[v]) / (counts.first.sum() + alpha_first)``.
  ``pop`` is the popularity distribution at its validated ``alpha``.
- :func:`cooccurrence` (``bi``): two rules, the rule itself chosen on validation. ``"mixture"``:
  ``p(v | S) = lam * pop[v] + (1 - lam) * mean_{w in S} cond[w, v]`` with
  ``cond[w, v] = (counts.pair[w, v] + alpha) / (counts.pair[w].sum() + alpha * n)``;
  ``"product"`` (a tempered naive Bayes, normalised over the items):
  ``p(v | S) ∝ pop[v] * prod_{w in S} like[w, v] ** weight`` with
  ``like[w, v] = (counts.pair[w, v] + alpha) / (counts.pair[:, v].sum() + alpha * n)``.
  ``S`` is the multiset of the other observations of the unit; a unit with a single observation
  falls back to ``pop``.

**No-repeat versions** (``exclude_context_items=True``; the like-for-like references of the EFA
and EFE rows fitted with the library's option of that name). No unit of these data repeats an item,
so an item already in a target's context can be ruled out: each of the three distributions above
gets ``p(v | c) = 0`` for every item ``v`` of the context ``c`` (``uni``: the earlier observations
of the unit; ``bi``: its other observations; context-only observations included, the rule of
:func:`~pyro_efa.attention.context_mask`) and is renormalised over the other items,
:func:`exclude_context`. Its hyperparameters (the ``alpha`` of ``pop`` too) are chosen again on
the validation units under the exclusion, from the same grids. The rows carry the same model
names, ``"exclude_context_items": True`` in their options and an architecture ending with
``", no repeats (exclude_context_items)"`` (:data:`NO_REPEATS`).

:func:`item_baselines` gives the rows of the results table (``no_repeat=True``: the no-repeat
versions; :func:`experiment_baselines`: both). Run ``python models/baselines.py
--task movielens_items`` (or ``--task instacart``); ``--smoke`` for the first few units only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pyro_efa import EFAData
from pyro_efa.attention import context_mask
from pyro_efa.data import data_schema
from pyro_efa.models.base import Splits, baseline_record, parser, smoke_splits

__all__ = [
    "COOCCURRENCE_GRID",
    "MARKOV_GRID",
    "MIXTURE_GRID",
    "NO_REPEATS",
    "POPULARITY_GRID",
    "PRODUCT_GRID",
    "TASKS",
    "ItemCounts",
    "Targets",
    "cooccurrence",
    "cooccurrence_probs",
    "cross_entropy",
    "exclude_context",
    "experiment_baselines",
    "item_baselines",
    "item_counts",
    "markov",
    "markov_probs",
    "num_targets",
    "popularity",
    "popularity_probs",
    "select",
]

#: the experiments these baselines are for
TASKS = ("movielens_items", "instacart")
#: add-``alpha`` smoothing of the item frequencies
POPULARITY_GRID: tuple[dict[str, Any], ...] = tuple(
    {"alpha": a} for a in (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0)
)
_PSEUDO = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
#: pseudo-counts of the popularity prior of the transitions and of the first position
MARKOV_GRID: tuple[dict[str, Any], ...] = tuple(
    {"alpha": a, "alpha_first": b} for a in _PSEUDO for b in _PSEUDO
)
_SMOOTHING = (0.001, 0.01, 0.1, 1.0, 10.0)
#: the ``"mixture"`` rule of :func:`cooccurrence`: add-``alpha`` smoothing and the weight ``lam`` of ``pop``
MIXTURE_GRID: tuple[dict[str, Any], ...] = tuple(
    {"rule": "mixture", "alpha": a, "lam": lam}
    for a in _SMOOTHING
    for lam in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
)
#: the ``"product"`` rule of :func:`cooccurrence`: add-``alpha`` smoothing and the exponent ``weight``
PRODUCT_GRID: tuple[dict[str, Any], ...] = tuple(
    {"rule": "product", "alpha": a, "weight": w}
    for a in _SMOOTHING
    for w in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
)
#: both rules: the rule itself is chosen on the validation units
COOCCURRENCE_GRID: tuple[dict[str, Any], ...] = MIXTURE_GRID + PRODUCT_GRID
#: the end of the architecture of a no-repeat row (that of the EFA and EFE rows with
#: ``exclude_context_items=True``; the results table compares them with one another only)
NO_REPEATS = ", no repeats (exclude_context_items)"


# ------------------------------------------------------------------------------------------------
# the targets and the training statistics
@dataclasses.dataclass(frozen=True)
class Targets:
    """The targets of a data set (``data.target & data.mask``), in the order of
    ``torch.nonzero(data.target & data.mask)`` (that of :func:`pyro_efa.predict`), ``T`` of them.

    :ivar ~torch.Tensor item: ``(T,)`` the item of each target.
    :ivar ~torch.Tensor unit: ``(T,)`` the unit of each target.
    :ivar ~torch.Tensor prev: ``(T,)`` the item of the observation just before the target in its
        unit, ``-1`` for a target without an earlier observation.
    :ivar ~torch.Tensor bag: ``(U, n)`` float64, ``bag[u, v]``: observations of item ``v`` in unit
        ``u`` (targets and context-only observations).
    :ivar ~torch.Tensor pos: ``(T,)`` the position of each target in its unit.
    :ivar ~torch.Tensor values: ``(U, L)`` the item at each position (0 at padding).
    :ivar ~torch.Tensor mask: ``(U, L)`` the observed positions.
    """

    item: torch.Tensor
    unit: torch.Tensor
    prev: torch.Tensor
    bag: torch.Tensor
    pos: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, data: EFAData, num_items: int) -> Targets:
        """The targets of ``data`` (item sequences over ``num_items`` items)."""
        if data.kind != "items":
            raise ValueError(f"the item baselines are for item sequences, got {data.kind!r} data")
        obs = data.mask
        x = torch.where(obs, data.values.long(), 0)
        before = torch.full_like(x, -1)
        before[:, 1:] = torch.where(obs[:, :-1], x[:, :-1], -1)
        unit, pos = torch.nonzero(data.target & obs, as_tuple=True)
        bag = torch.zeros(len(data), num_items, dtype=torch.float64)
        u_obs = torch.nonzero(obs, as_tuple=True)[0]
        bag.index_put_((u_obs, x[obs]), torch.ones(len(u_obs), dtype=torch.float64), accumulate=True)
        return cls(x[unit, pos], unit, before[unit, pos], bag, pos, x, obs)

    def __len__(self) -> int:
        return self.item.numel()

    def context(self, direction: str) -> torch.Tensor:
        """``(T, n)`` boolean: True where item ``v`` is observed in the context of target ``t``,
        the positions :func:`~pyro_efa.attention.context_mask` gives it (``uni``: the earlier ones,
        ``bi``: the others; context-only observations included). Computed once per direction."""
        key = f"context {direction}"
        if key not in self._cache:
            index = torch.full_like(self.values, -1)
            index[self.unit, self.pos] = torch.arange(len(self))
            u, i, j = torch.nonzero(
                context_mask(self.mask, direction) & (index >= 0)[..., None], as_tuple=True
            )  # position j of unit u is in the context of the target at position i
            ctx = torch.zeros(len(self), self.bag.size(1), dtype=torch.bool)
            ctx[index[u, i], self.values[u, j]] = True
            self._cache[key] = ctx
        return self._cache[key]

    def context_pairs(self, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, items)``, ``(K,)`` each: the nonzeros of :meth:`context`, target ``rows[k]``
        has item ``items[k]`` in its context. Computed once per direction."""
        key = f"pairs {direction}"
        if key not in self._cache:
            self._cache[key] = torch.nonzero(self.context(direction), as_tuple=True)
        return self._cache[key]

    def take(self, rows: torch.Tensor) -> Targets:
        """The targets ``rows`` (``(K,)`` indices into these, repeats allowed), of the same units:
        for their probabilities only (:meth:`context` needs each target once)."""
        return dataclasses.replace(
            self,
            item=self.item[rows],
            unit=self.unit[rows],
            prev=self.prev[rows],
            pos=self.pos[rows],
        )


@dataclasses.dataclass(frozen=True)
class ItemCounts:
    """Counts of the training units (float64 tensors, ``n`` items).

    :ivar ~torch.Tensor item: ``(n,)``, ``item[v]``: training targets with item ``v``.
    :ivar ~torch.Tensor first: ``(n,)``, ``first[v]``: training targets with item ``v`` and no
        earlier observation in their unit.
    :ivar ~torch.Tensor transition: ``(n, n)``, ``transition[w, v]``: training targets with item
        ``v`` whose previous observation is item ``w``.
    :ivar ~torch.Tensor pair: ``(n, n)``, ``pair[w, v]``: (other observation, target) pairs of one
        training unit with other item ``w`` and target item ``v``.
    :ivar dict schema: the vocabularies of the training data (held-out data is put in them).
    """

    item: torch.Tensor
    first: torch.Tensor
    transition: torch.Tensor
    pair: torch.Tensor
    schema: dict[str, Any]

    @property
    def num_items(self) -> int:
        """``n``, the number of items."""
        return self.item.numel()

    def targets(self, data: EFAData) -> Targets:
        """The :class:`Targets` of ``data`` in the training vocabulary (as EFA's scoring does)."""
        return Targets.of(data.conform(self.schema), self.num_items)


def item_counts(train: EFAData) -> ItemCounts:
    """The counts of :class:`ItemCounts` from the training units ``train``."""
    n = len(train.items)
    t = Targets.of(train, n)
    item = torch.bincount(t.item, minlength=n).double()
    first = torch.bincount(t.item[t.prev < 0], minlength=n).double()
    after = t.prev >= 0
    transition = torch.bincount(t.prev[after] * n + t.item[after], minlength=n * n).double().view(n, n)
    # pair[w, v] = sum over targets t of (observations of w in unit[t]) - (t itself when w = v)
    per_unit = torch.zeros_like(t.bag).index_put_(
        (t.unit, t.item), torch.ones(len(t), dtype=torch.float64), accumulate=True
    )  # targets of item v in unit u
    pair = t.bag.T @ per_unit
    pair.diagonal().sub_(item)
    return ItemCounts(item, first, transition, pair, data_schema(train))


# ------------------------------------------------------------------------------------------------
# the distributions: p(item v | context of target t), targets in the order of Targets
def _pick(table: torch.Tensor, rows: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
    """``table[rows]`` (``(T, n)``), or ``table[rows, items]`` (``(T,)``) when ``items`` are given."""
    return table[rows] if items is None else table[rows, items]


def _no_repeat_context(targets: Targets, direction: str) -> torch.Tensor:
    """:meth:`Targets.context`, refused when a target's item is in its own context."""
    ctx = targets.context(direction)
    if ctx.gather(-1, targets.item[:, None]).any():
        raise ValueError(
            "a target's item is already in its context: exclude_context_items needs units that "
            "never repeat an item"
        )
    return ctx


def exclude_context(
    probs: torch.Tensor, targets: Targets, direction: str, items: torch.Tensor | None = None
) -> torch.Tensor:
    """The no-repeat version of the distributions ``probs`` (``(T, n)``, one per target): 0 on the
    items of each target's context (:meth:`Targets.context` of ``direction``), renormalised over
    the other items; ``(T, n)``, or ``(T,)`` the probability of ``items[t]`` with ``items``.

    :raises ValueError: when a target's item is in its context (a unit repeats an item).
    """
    kept = probs.masked_fill(_no_repeat_context(targets, direction), 0.0)
    total = kept.sum(-1)
    return kept / total[:, None] if items is None else kept.gather(-1, items[:, None])[:, 0] / total


def _without_context(
    probs: Callable[..., torch.Tensor],
    targets: Targets,
    direction: str,
    items: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`exclude_context` of the distributions ``probs(targets, items=None)``; with ``items``
    without them: ``probs(targets, items=items)[t] / (1 - sum_{v in c_t} p(v | c_t))`` (0 for an
    item of ``c_t``), the mass of the context items from their probabilities alone (a few per
    target rather than ``n``)."""
    if items is None:
        return exclude_context(probs(targets, items=None), targets, direction)
    in_context = _no_repeat_context(targets, direction).gather(-1, items[:, None])[:, 0]
    rows, ctx_items = targets.context_pairs(direction)
    mass = torch.zeros(len(targets), dtype=torch.float64)
    mass.index_add_(0, rows, probs(targets.take(rows), items=ctx_items))
    return (probs(targets, items=items) / (1.0 - mass)).masked_fill(in_context, 0.0)


def popularity_probs(
    counts: ItemCounts,
    targets: Targets,
    alpha: float,
    items: torch.Tensor | None = None,
    exclude_context_items: bool = False,
    direction: str = "uni",
) -> torch.Tensor:
    """``pop[v] = (counts.item[v] + alpha) / (counts.item.sum() + alpha * n)`` for every target,
    ``(T, n)``. With ``items`` (``(T,)``, e.g. ``targets.item``) only the probability of
    ``items[t]`` for each target ``t``, ``(T,)``; with ``exclude_context_items`` the no-repeat
    version (:func:`exclude_context`) for the contexts of ``direction``; so for every ``*_probs``
    function (:func:`markov_probs` is ``uni``, :func:`cooccurrence_probs` ``bi``)."""
    if exclude_context_items:
        plain = functools.partial(popularity_probs, counts, alpha=alpha)
        return _without_context(plain, targets, direction, items)
    pop = (counts.item + alpha) / (counts.item.sum() + alpha * counts.num_items)
    return _pick(pop[None], torch.zeros_like(targets.item), items)


def markov_probs(
    counts: ItemCounts,
    targets: Targets,
    alpha: float,
    alpha_first: float,
    pop: torch.Tensor,
    items: torch.Tensor | None = None,
    exclude_context_items: bool = False,
) -> torch.Tensor:
    """First-order Markov chain smoothed toward ``pop`` (``(n,)``), ``(T, n)``:
    ``(counts.transition[w, v] + alpha * pop[v]) / (counts.transition[w].sum() + alpha)`` after an
    observation of item ``w``, ``(counts.first[v] + alpha_first * pop[v]) / (counts.first.sum() +
    alpha_first)`` without an earlier observation (``exclude_context_items``: without the earlier
    items of the unit, :func:`exclude_context`)."""
    if exclude_context_items:
        plain = functools.partial(markov_probs, counts, alpha=alpha, alpha_first=alpha_first, pop=pop)
        return _without_context(plain, targets, "uni", items)
    trans = (counts.transition + alpha * pop) / (counts.transition.sum(1, keepdim=True) + alpha)
    first = (counts.first + alpha_first * pop) / (counts.first.sum() + alpha_first)
    after = targets.prev >= 0
    if items is None:
        after = after[:, None]
    zeros = torch.zeros_like(targets.item)
    return torch.where(
        after, _pick(trans, targets.prev.clamp(min=0), items), _pick(first[None], zeros, items)
    )


def cooccurrence_probs(
    counts: ItemCounts,
    targets: Targets,
    alpha: float,
    pop: torch.Tensor,
    rule: str = "mixture",
    lam: float = 0.0,
    weight: float = 1.0,
    items: torch.Tensor | None = None,
    exclude_context_items: bool = False,
) -> torch.Tensor:
    """Item given the other observations ``S`` of its unit, ``(T, n)`` (module docs).

    :param str rule: ``"mixture"``: ``lam * pop[v] + (1 - lam) * mean_{w in S} cond[w, v]``;
        ``"product"``: ``softmax_v(log pop[v] + weight * sum_{w in S} log like[w, v])``.
    :param pop: ``(n,)`` the popularity distribution (also the answer when ``S`` is empty).
    :param bool exclude_context_items: without the items of ``S`` (:func:`exclude_context`;
        ``"product"``: their scores set to ``-inf`` before the normalisation, the same).
    """
    if exclude_context_items and rule != "product":
        plain = functools.partial(
            cooccurrence_probs, counts, alpha=alpha, pop=pop, rule=rule, lam=lam, weight=weight
        )
        return _without_context(plain, targets, "bi", items)
    t, n = targets, counts.num_items
    size = t.bag.sum(1)[t.unit] - 1.0  # |S|: the unit's observations but the target
    zeros = torch.zeros_like(t.item)
    if items is None:
        size = size[:, None]
    if rule == "mixture":
        cond = (counts.pair + alpha) / (counts.pair.sum(1, keepdim=True) + alpha * n)
        others = _pick(t.bag @ cond, t.unit, items) - _pick(cond, t.item, items)  # sum_{w in S}
        mixed = lam * _pick(pop[None], zeros, items) + (1.0 - lam) * others / size.clamp(min=1.0)
    elif rule == "product":
        like = ((counts.pair + alpha) / (counts.pair.sum(0, keepdim=True) + alpha * n)).log()
        # log pop[v] + weight * sum_{w in S} log like[w, v], (T, n), in place
        score = (t.bag @ like).index_select(0, t.unit).sub_(like.index_select(0, t.item))
        score.mul_(weight).add_(pop.log())
        if exclude_context_items:
            score.masked_fill_(_no_repeat_context(t, "bi"), -math.inf)
        log_z = torch.logsumexp(score, -1)
        mixed = (
            score - log_z[:, None] if items is None else score.gather(-1, items[:, None])[:, 0] - log_z
        ).exp()
    else:
        raise ValueError(f"rule must be 'mixture' or 'product', got {rule!r}")
    return torch.where(size > 0, mixed, _pick(pop[None], zeros, items))


# ------------------------------------------------------------------------------------------------
# the metric and the choice of hyperparameters
def num_targets(data: EFAData) -> int:
    """The number of targets of ``data`` (``data.target & data.mask``): what EFA's scores count."""
    return int((data.target & data.mask).sum())


def cross_entropy(probs: torch.Tensor, targets: Targets) -> float:
    """``mean over targets t of -log probs[t, targets.item[t]]`` in nats (EFA's ``"nll"``);
    ``probs`` ``(T, n)`` a distribution over the items per target, or ``(T,)`` the probability of
    each target's item."""
    if len(targets) == 0:
        raise ValueError("no targets to score")
    p = probs if probs.dim() == 1 else probs.gather(-1, targets.item[:, None])[:, 0]
    return float(-p.log().mean())


def select(
    probs: Callable[..., torch.Tensor],
    counts: ItemCounts,
    val: Targets,
    grid: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, Any], float]:
    """The options of ``grid`` with the lowest validation cross-entropy (the first on a tie) and
    that cross-entropy; ``probs(counts, val, items=val.item, **options)`` gives the probability of
    each validation target."""
    best: tuple[dict[str, Any], float] | None = None
    for options in grid:
        ce = cross_entropy(probs(counts, val, items=val.item, **options), val)
        if best is None or ce < best[1]:
            best = (dict(options), ce)
    if best is None:
        raise ValueError("empty grid")
    return best


# ------------------------------------------------------------------------------------------------
# the baselines: one row of the results table each
def _row(
    name: str,
    direction: str,
    options: dict[str, Any],
    architecture: str,
    scores: tuple[float, float],
    start: float,
) -> dict[str, Any]:
    elapsed = time.perf_counter() - start
    return baseline_record("", direction, name, "nll", *scores, architecture, options, elapsed)


def _choose(
    splits: Splits, probs: Callable[..., torch.Tensor], grid: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any], tuple[float, float]]:
    """Counts of the training units, options from ``grid`` on the validation units, and the
    validation and test cross-entropies at those options."""
    train, val, test = splits
    counts = item_counts(train)
    val_targets, test_targets = counts.targets(val), counts.targets(test)
    options, val_ce = select(probs, counts, val_targets, grid)
    test_ce = cross_entropy(probs(counts, test_targets, **options), test_targets)
    return options, (val_ce, test_ce)


def _popularity(
    splits: Splits,
    grid: Sequence[Mapping[str, Any]],
    direction: str = "uni",
    exclude_context_items: bool = False,
) -> tuple[float, torch.Tensor]:
    """The validated ``alpha`` of :func:`popularity` (of ``direction``, no-repeat version with
    ``exclude_context_items``) and its distribution ``pop`` over all items, ``(n,)``."""
    probs = functools.partial(
        popularity_probs, exclude_context_items=exclude_context_items, direction=direction
    )
    alpha = _choose(splits, probs, grid)[0]["alpha"]
    counts = item_counts(splits[0])
    return alpha, (counts.item + alpha) / (counts.item.sum() + alpha * counts.num_items)


def _no_repeat(options: dict[str, Any], text: str, exclude_context_items: bool) -> tuple[dict[str, Any], str]:
    """The options and architecture of a row, marked as a no-repeat row when it is one."""
    if not exclude_context_items:
        return options, text
    return {**options, "exclude_context_items": True}, text + NO_REPEATS


def popularity(
    splits: Splits,
    direction: str = "uni",
    grid: Sequence[Mapping[str, Any]] = POPULARITY_GRID,
    exclude_context_items: bool = False,
) -> dict[str, Any]:
    """Add-``alpha`` training frequency of each item, whatever the context (``alpha`` from
    ``grid`` on the validation units); a row of the results table (``experiment`` left empty).
    ``exclude_context_items``: the no-repeat version (module docs)."""
    start = time.perf_counter()
    probs = functools.partial(
        popularity_probs, exclude_context_items=exclude_context_items, direction=direction
    )
    options, scores = _choose(splits, probs, grid)
    text = f"add-alpha, alpha={options['alpha']:g} (validation)"
    options, text = _no_repeat(options, text, exclude_context_items)
    return _row("popularity", direction, options, text, scores, start)


def markov(
    splits: Splits,
    grid: Sequence[Mapping[str, Any]] = MARKOV_GRID,
    popularity_grid: Sequence[Mapping[str, Any]] = POPULARITY_GRID,
    exclude_context_items: bool = False,
) -> dict[str, Any]:
    """First-order Markov chain (``uni``), smoothed toward the popularity distribution (whose
    ``alpha`` is chosen first, as in :func:`popularity`); the pseudo-counts from ``grid`` on the
    validation units. ``exclude_context_items``: the no-repeat version (module docs)."""
    start = time.perf_counter()
    pop_alpha, pop = _popularity(splits, popularity_grid, "uni", exclude_context_items)
    probs = functools.partial(markov_probs, pop=pop, exclude_context_items=exclude_context_items)
    options, scores = _choose(splits, probs, grid)
    text = (
        f"first order toward popularity (alpha={pop_alpha:g}), alpha={options['alpha']:g}, "
        f"first position alpha={options['alpha_first']:g} (validation)"
    )
    options, text = _no_repeat({**options, "popularity_alpha": pop_alpha}, text, exclude_context_items)
    return _row("markov", "uni", options, text, scores, start)


def cooccurrence(
    splits: Splits,
    grid: Sequence[Mapping[str, Any]] = COOCCURRENCE_GRID,
    popularity_grid: Sequence[Mapping[str, Any]] = POPULARITY_GRID,
    exclude_context_items: bool = False,
) -> dict[str, Any]:
    """Item given the other items of its unit (``bi``) from co-occurrence counts: the rule
    (``"mixture"`` or ``"product"``) and its options from ``grid`` on the validation units.
    ``exclude_context_items``: the no-repeat version (module docs)."""
    start = time.perf_counter()
    pop_alpha, pop = _popularity(splits, popularity_grid, "bi", exclude_context_items)
    probs = functools.partial(cooccurrence_probs, pop=pop, exclude_context_items=exclude_context_items)
    options, scores = _choose(splits, probs, grid)
    if options["rule"] == "mixture":
        text = f"lam*pop + (1-lam)*mean_j P(i|j), alpha={options['alpha']:g}, lam={options['lam']:g}"
    else:
        text = f"pop(i)*prod_j P(j|i)^w normalised, alpha={options['alpha']:g}, w={options['weight']:g}"
    options = {**options, "popularity_alpha": pop_alpha}
    options, text = _no_repeat(options, f"{text} (validation)", exclude_context_items)
    return _row("cooccurrence", "bi", options, text, scores, start)


def item_baselines(
    experiment: str,
    splits: Splits,
    directions: Sequence[str] = ("uni", "bi"),
    no_repeat: bool = False,
) -> list[dict[str, Any]]:
    """The rows of the results table: per direction :func:`popularity`, then :func:`markov`
    (``uni``) or :func:`cooccurrence` (``bi``); ``no_repeat``: their no-repeat versions
    (``exclude_context_items=True``, the architecture ending with :data:`NO_REPEATS`)."""
    rows = []
    for direction in directions:
        if direction not in ("uni", "bi"):
            raise ValueError(f"direction must be 'uni' or 'bi', got {direction!r}")
        rows.append(popularity(splits, direction, exclude_context_items=no_repeat))
        if direction == "uni":
            rows.append(markov(splits, exclude_context_items=no_repeat))
        else:
            rows.append(cooccurrence(splits, exclude_context_items=no_repeat))
    return [{**row, "experiment": experiment} for row in rows]


def experiment_baselines(experiment: str) -> Callable[[Splits, Path], list[dict[str, Any]]]:
    """:attr:`Experiment.baselines <pyro_efa.models.base.Experiment>` of the item-sequence
    experiment ``experiment``: :func:`item_baselines` of its directions, the plain rows then the
    no-repeat rows."""

    def run(splits: Splits, data_dir: Path) -> list[dict[str, Any]]:
        plain = item_baselines(experiment, splits)
        return plain + item_baselines(experiment, splits, no_repeat=True)

    return run


def main(argv: list[str] | None = None) -> int:
    """``python models/baselines.py --task movielens_items|instacart [--data-dir D] [--smoke]``:
    one line per baseline and direction, the plain ones then the no-repeat ones (the fit options
    of the other scripts are ignored)."""
    from pyro_efa.models import get  # the package imports this module

    torch.set_num_threads(1)
    args = parser("Count baselines of the item-sequence experiments.", list(TASKS)).parse_args(argv)
    experiment = get(args.task)
    splits = experiment.load(args.data_dir)
    if args.smoke:
        splits = smoke_splits(splits)
    train, val, test = splits
    print(f"{experiment.name}: train {train}\n  validation {val}\n  test {test}")
    print(f"{'model':<22} {'val':>8} {'test':>8}   chosen on validation")
    directions = args.direction or experiment.directions
    rows = item_baselines(experiment.name, splits, directions)
    for row in rows + item_baselines(experiment.name, splits, directions, no_repeat=True):
        label = f"{row['model']} {row['direction']}"
        print(f"{label:<22} {row['val']:>8.4f} {row['test']:>8.4f}   {row['architecture']}")
    for direction in directions:
        paper = {m: experiment.paper.get((m, direction)) for m in ("efa", "efe")}
        print(f"paper ({direction}): EFA {paper['efa']:.4f}, EFE {paper['efe']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
