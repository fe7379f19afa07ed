"""The count baselines of the item-sequence experiments (``models/baselines.py``): counts,
distributions and cross-entropies against brute-force loops on tiny hand-built units, the target
set against EFA's scoring, the choice of hyperparameters on validation units only, the no-repeat
versions (``exclude_context_items``) against loops and against EFA with that option, and the real
MovieLens items (skipped without the data)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from pyro_efa import EFA, EFAData, FitOptions, evaluate, fit
from pyro_efa.models import baselines as bl
from pyro_efa.models import get

ITEMS = ["a", "b", "c", "d", "e"]
N = len(ITEMS)
TRAIN = [["a", "b", "c"], ["b", "c"], ["a", "c", "d"], ["e"], ["c", "a", "b", "d"]]
VAL = [["a", "c"], ["b", "c", "d"]]
TEST = [["c", "a", "d"], ["b"], ["d", "c", "e", "a"]]


def _table(units: list[list[str]], context: list[list[bool]] | None = None) -> pd.DataFrame:
    rows = [
        {"u": u, "item": item, "t": i, "ctx": bool(context and context[u][i])}
        for u, seq in enumerate(units)
        for i, item in enumerate(seq)
    ]
    return pd.DataFrame(rows)


def _data(units, items=None, context=None) -> EFAData:
    df = _table(units, context)
    ctx = "ctx" if context is not None else None
    return EFAData.from_pandas(df, unit="u", key="item", order="t", context=ctx, items=items)


@pytest.fixture
def splits():
    train = _data(TRAIN)
    assert train.items.labels == ITEMS
    return train, _data(VAL, train.items), _data(TEST, train.items)


def _idx(units):
    return [[ITEMS.index(v) for v in seq] for seq in units]


def _brute_counts(units):
    item, first = [0.0] * N, [0.0] * N
    trans = [[0.0] * N for _ in range(N)]
    pair = [[0.0] * N for _ in range(N)]
    for seq in _idx(units):
        for i, v in enumerate(seq):
            item[v] += 1
            if i == 0:
                first[v] += 1
            else:
                trans[seq[i - 1]][v] += 1
            for j, w in enumerate(seq):
                if j != i:
                    pair[w][v] += 1
    return [torch.tensor(x, dtype=torch.float64) for x in (item, first, trans, pair)]


def _pop(alpha, units=TRAIN):
    item = _brute_counts(units)[0]
    return (item + alpha) / (item.sum() + alpha * N)


# ------------------------------------------------------------------------------------------------
# counts and distributions against loops
def test_counts_by_hand(splits):
    counts = bl.item_counts(splits[0])
    item, first, trans, pair = _brute_counts(TRAIN)
    got = (counts.item, counts.first, counts.transition, counts.pair)
    for g, want in zip(got, (item, first, trans, pair), strict=True):
        assert torch.equal(g, want)
    assert counts.item.tolist() == [3, 3, 4, 2, 1]  # a b c d e
    assert counts.pair[2, 0] == 3  # c and a share three training units
    assert counts.pair.diagonal().eq(0).all()  # items do not repeat within a unit


def test_popularity_by_hand(splits):
    counts = bl.item_counts(splits[0])
    t = counts.targets(splits[2])
    probs = bl.popularity_probs(counts, t, alpha=0.5)
    pop = (torch.tensor([3, 3, 4, 2, 1.0], dtype=torch.float64) + 0.5) / (13 + 0.5 * 5)
    assert probs.shape == (8, N) and torch.allclose(probs, pop.expand(8, N))
    assert torch.allclose(probs.sum(-1), torch.ones(8, dtype=torch.float64))
    test_items = [v for seq in _idx(TEST) for v in seq]
    want = -sum(math.log(pop[v]) for v in test_items) / len(test_items)
    assert bl.cross_entropy(probs, t) == pytest.approx(want, rel=1e-12)
    picked = bl.popularity_probs(counts, t, alpha=0.5, items=t.item)
    assert bl.cross_entropy(picked, t) == pytest.approx(want, rel=1e-12)


def _brute_markov(units, alpha, alpha_first, pop):
    _, first, trans, _ = _brute_counts(TRAIN)
    rows = []
    for seq in _idx(units):
        for i, _v in enumerate(seq):
            if i == 0:
                rows.append(
                    [(first[v] + alpha_first * pop[v]) / (first.sum() + alpha_first) for v in range(N)]
                )
            else:
                w = seq[i - 1]
                rows.append([(trans[w][v] + alpha * pop[v]) / (trans[w].sum() + alpha) for v in range(N)])
    return torch.tensor(rows, dtype=torch.float64)


def test_markov_by_hand(splits):
    counts = bl.item_counts(splits[0])
    t = counts.targets(splits[2])
    alpha, alpha_first, pop = 2.0, 3.0, _pop(1.0)
    probs = bl.markov_probs(counts, t, alpha, alpha_first, pop)
    want = _brute_markov(TEST, alpha, alpha_first, pop)
    assert torch.allclose(probs, want, rtol=1e-12, atol=0)
    assert torch.allclose(probs.sum(-1), torch.ones(len(t), dtype=torch.float64))
    picked = bl.markov_probs(counts, t, alpha, alpha_first, pop, items=t.item)
    assert torch.allclose(picked, probs.gather(-1, t.item[:, None])[:, 0], rtol=1e-12, atol=0)


def _brute_cooccurrence(units, rule, alpha, pop, lam=0.0, weight=1.0):
    pair = _brute_counts(TRAIN)[3]
    cond = (pair + alpha) / (pair.sum(1, keepdim=True) + alpha * N)  # cond[w, v] = P(v | w)
    like = (pair + alpha) / (pair.sum(0, keepdim=True) + alpha * N)  # like[w, v] = P(w | v)
    rows = []
    for seq in _idx(units):
        for i in range(len(seq)):
            others = [w for j, w in enumerate(seq) if j != i]
            if not others:
                rows.append(pop.tolist())
            elif rule == "mixture":
                rows.append(
                    [
                        lam * pop[v] + (1 - lam) * sum(cond[w, v] for w in others) / len(others)
                        for v in range(N)
                    ]
                )
            else:
                score = [pop[v] * math.prod(like[w, v] ** weight for w in others) for v in range(N)]
                rows.append([s / sum(score) for s in score])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(("rule", "extra"), [("mixture", {"lam": 0.3}), ("product", {"weight": 0.5})])
def test_cooccurrence_by_hand(splits, rule, extra):
    counts = bl.item_counts(splits[0])
    t = counts.targets(splits[2])
    pop = _pop(1.0)
    probs = bl.cooccurrence_probs(counts, t, 0.7, pop, rule=rule, **extra)
    want = _brute_cooccurrence(TEST, rule, 0.7, pop, **extra)
    assert torch.allclose(probs, want, rtol=1e-12, atol=0)
    assert torch.allclose(probs.sum(-1), torch.ones(len(t), dtype=torch.float64))
    assert torch.equal(probs[3], pop)  # the single-item unit ["b"] falls back to popularity
    assert (probs > 0).all()  # every item a candidate, context items too
    picked = bl.cooccurrence_probs(counts, t, 0.7, pop, rule=rule, items=t.item, **extra)
    assert torch.allclose(picked, probs.gather(-1, t.item[:, None])[:, 0], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="rule"):
        bl.cooccurrence_probs(counts, t, 0.7, pop, rule="max")


def test_context_only_observations_are_contexts_not_targets(splits):
    # the second item of the first unit and the first of the last are context-only
    context = [[False, True, False], [False], [True, False, False, False]]
    test = _data(TEST, splits[0].items, context)
    counts = bl.item_counts(splits[0])
    t = counts.targets(test)
    assert len(t) == bl.num_targets(test) == 6 == int(test.mask.sum()) - 2
    pop = _pop(1.0)
    full = _brute_cooccurrence(TEST, "product", 0.7, pop, weight=0.5)
    keep = torch.tensor([True, False, True, True, False, True, True, True])
    got = bl.cooccurrence_probs(counts, t, 0.7, pop, rule="product", weight=0.5)
    assert torch.allclose(got, full[keep], rtol=1e-12, atol=0)
    # Markov: "d" of unit 0 follows the context-only "a"; "c" of unit 2 follows the context-only "d"
    assert t.prev.tolist() == [-1, 0, -1, 3, 2, 4]


# ------------------------------------------------------------------------------------------------
# the same targets and metric as EFA
def _zero_readout_efa(splits, direction, **config):
    """A tiny EFA fitted one epoch, its readout ``rho`` set to zero and its intercept to the
    add-one training frequencies: the training units, the test units with context-only rows,
    and ``evaluate`` of the EFA on them."""
    train = splits[0]
    test = _data(TEST, train.items, [[False, True, False], [False], [False, False, True, False]])
    model = EFA.from_data(train, direction=direction, dim=4, num_layers=1, num_heads=1, head_dim=4, **config)
    fitted = fit(model, train, options=FitOptions(num_epochs=1, seed=0), progress=False)
    with torch.no_grad():
        rho = [p for name, p in fitted.guide.named_parameters() if "rho" in name]
        assert rho
        for p in rho:
            p.zero_()
        fitted.efa.init_intercept(train)
    return train, test, evaluate(fitted, test)


@pytest.mark.parametrize("direction", ["uni", "bi"])
def test_popularity_equals_efa_with_a_zero_readout(splits, direction):
    """An EFA whose readout embeddings are zero predicts ``softmax(intercept)`` everywhere, and its
    intercept starts at the add-one training frequencies: ``evaluate`` then reports the popularity
    baseline's cross-entropy at ``alpha=1``, over the same targets (context-only ones left out)."""
    train, test, metrics = _zero_readout_efa(splits, direction)
    counts = bl.item_counts(train)
    t = counts.targets(test)
    assert metrics["num_observations"] == len(t) == bl.num_targets(test) == 6
    ce = bl.cross_entropy(bl.popularity_probs(counts, t, alpha=1.0), t)
    assert metrics["nll"] == pytest.approx(ce, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# hyperparameters from validation units only
def test_alpha_is_chosen_on_validation_not_test():
    train = _data([["a", "b"], ["a", "c"], ["a", "d"], ["a", "e"], ["a", "b"]])
    val = _data([["a"], ["a"], ["a"], ["b"]], train.items)  # the frequent item: little smoothing
    test = _data([["e"], ["d"], ["c"], ["e"]], train.items)  # rare items: much smoothing
    grid = [{"alpha": a} for a in (0.01, 1.0, 50.0)]
    counts = bl.item_counts(train)

    def ce(data, alpha):
        t = counts.targets(data)
        return bl.cross_entropy(bl.popularity_probs(counts, t, alpha), t)

    best_val = min(grid, key=lambda g: ce(val, g["alpha"]))
    best_test = min(grid, key=lambda g: ce(test, g["alpha"]))
    assert best_val != best_test  # the test units would choose otherwise
    row = bl.popularity((train, val, test), grid=grid)
    assert row["options"] == best_val
    assert row["val"] == pytest.approx(ce(val, best_val["alpha"]))
    assert row["test"] == pytest.approx(ce(test, best_val["alpha"]))
    assert row["test"] > ce(test, best_test["alpha"])


def test_select_keeps_the_first_of_a_tie(splits):
    counts = bl.item_counts(splits[0])
    t = counts.targets(splits[1])
    options, _ = bl.select(
        lambda c, targets, items, alpha: bl.popularity_probs(c, targets, 1.0, items), counts, t,
        [{"alpha": 3.0}, {"alpha": 1.0}],
    )  # fmt: skip
    assert options == {"alpha": 3.0}
    with pytest.raises(ValueError, match="empty grid"):
        bl.select(bl.popularity_probs, counts, t, [])


def test_item_baselines_rows(splits):
    rows = bl.item_baselines("tiny", splits)
    assert [(r["model"], r["direction"]) for r in rows] == [
        ("popularity", "uni"), ("markov", "uni"), ("popularity", "bi"), ("cooccurrence", "bi"),
    ]  # fmt: skip
    keys = {
        "experiment", "direction", "model", "seed", "guide", "metric", "architecture", "recommended",
        "val", "test", "epochs", "best_epoch", "seconds", "options",
    }  # fmt: skip
    for row in rows:
        assert set(row) == keys
        assert row["experiment"] == "tiny" and row["metric"] == "nll" and row["recommended"] is True
        assert isinstance(row["val"], float) and isinstance(row["test"], float) and row["seconds"] >= 0
        assert "(validation)" in row["architecture"]
    again = bl.item_baselines("tiny", splits)
    assert [{**r, "seconds": 0} for r in rows] == [{**r, "seconds": 0} for r in again]  # deterministic
    # the rows' numbers are those of the distributions at the chosen options
    counts = bl.item_counts(splits[0])
    t = counts.targets(splits[2])
    alpha = rows[0]["options"]["alpha"]
    assert rows[0]["test"] == bl.cross_entropy(bl.popularity_probs(counts, t, alpha), t)
    assert rows[2]["val"] == rows[0]["val"] and rows[2]["test"] == rows[0]["test"]
    with pytest.raises(ValueError, match="direction"):
        bl.item_baselines("tiny", splits, ["both"])


# ------------------------------------------------------------------------------------------------
# the no-repeat versions (exclude_context_items)
#: context-only observations: the second of the first unit, the first of the last
CONTEXT = [[False, True, False], [False], [True, False, False, False]]
KEEP = [not c for seq in CONTEXT for c in seq]  # the positions of TEST that are targets


def _brute_contexts(units, direction):
    """Per position of ``units``: the set of items in its context (every other observation,
    context-only ones too; ``uni``: the earlier ones only)."""
    return [
        {w for j, w in enumerate(seq) if (j < i if direction == "uni" else j != i)}
        for seq in _idx(units)
        for i in range(len(seq))
    ]


def _brute_exclude(full, units, direction):
    """Each row of ``full`` (one per position of ``units``) 0 on its context items, renormalised."""
    rows = []
    for row, ctx in zip(full.tolist(), _brute_contexts(units, direction), strict=True):
        total = sum(p for v, p in enumerate(row) if v not in ctx)
        rows.append([0.0 if v in ctx else p / total for v, p in enumerate(row)])
    return torch.tensor(rows, dtype=torch.float64)


NO_REPEAT_CASES = {
    "popularity uni": (
        "uni", lambda c, t, **kw: bl.popularity_probs(c, t, 0.5, direction="uni", **kw), lambda: _pop(0.5),
    ),
    "popularity bi": (
        "bi", lambda c, t, **kw: bl.popularity_probs(c, t, 0.5, direction="bi", **kw), lambda: _pop(0.5),
    ),
    "markov": (
        "uni", lambda c, t, **kw: bl.markov_probs(c, t, 2.0, 3.0, _pop(1.0), **kw),
        lambda: _brute_markov(TEST, 2.0, 3.0, _pop(1.0)),
    ),
    "mixture": (
        "bi", lambda c, t, **kw: bl.cooccurrence_probs(c, t, 0.7, _pop(1.0), rule="mixture", lam=0.3, **kw),
        lambda: _brute_cooccurrence(TEST, "mixture", 0.7, _pop(1.0), lam=0.3),
    ),
    "product": (
        "bi",
        lambda c, t, **kw: bl.cooccurrence_probs(c, t, 0.7, _pop(1.0), rule="product", weight=0.5, **kw),
        lambda: _brute_cooccurrence(TEST, "product", 0.7, _pop(1.0), weight=0.5),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NO_REPEAT_CASES))
def test_no_repeat_probs_by_hand(splits, case):
    direction, probs_of, brute = NO_REPEAT_CASES[case]
    test = _data(TEST, splits[0].items, CONTEXT)
    counts = bl.item_counts(splits[0])
    t = counts.targets(test)
    full = brute()
    full = full.expand(len(KEEP), N) if full.dim() == 1 else full  # popularity: one row for all
    keep = torch.tensor(KEEP)
    want = _brute_exclude(full, TEST, direction)[keep]
    got = probs_of(counts, t, exclude_context_items=True)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # 0 on the context items (context-only observations included), a distribution over the rest
    ctx = [c for c, k in zip(_brute_contexts(TEST, direction), KEEP, strict=True) if k]
    in_ctx = torch.tensor([[v in c for v in range(N)] for c in ctx])
    assert torch.equal(t.context(direction), in_ctx)
    assert got[in_ctx].eq(0).all() and (got[~in_ctx] > 0).all()
    assert torch.allclose(got.sum(-1), torch.ones(len(t), dtype=torch.float64), rtol=1e-12, atol=0)
    assert in_ctx.any(-1).sum() >= 4  # the check bites: most targets have context items
    # the probability of one item per target, and the plain version unchanged by the option's default
    picked = probs_of(counts, t, items=t.item, exclude_context_items=True)
    assert torch.allclose(picked, got.gather(-1, t.item[:, None])[:, 0], rtol=1e-12, atol=0)
    others = (t.item + 1) % N  # context items too: probability 0
    picked = probs_of(counts, t, items=others, exclude_context_items=True)
    assert torch.allclose(picked, got.gather(-1, others[:, None])[:, 0], rtol=1e-12, atol=1e-300)
    assert torch.allclose(bl.exclude_context(probs_of(counts, t), t, direction), got, rtol=1e-12, atol=0)
    assert torch.allclose(probs_of(counts, t), full[keep], rtol=1e-12, atol=0)


def test_no_repeat_refuses_repeated_items(splits):
    counts = bl.item_counts(splits[0])
    t = counts.targets(_data([["a", "b", "a"]], splits[0].items))
    with pytest.raises(ValueError, match="already in its context"):
        bl.popularity_probs(counts, t, 1.0, exclude_context_items=True)
    with pytest.raises(ValueError, match="already in its context"):
        bl.cooccurrence_probs(counts, t, 1.0, _pop(1.0), rule="product", exclude_context_items=True)


@pytest.mark.parametrize("direction", ["uni", "bi"])
def test_no_repeat_popularity_equals_efa_with_a_zero_readout(splits, direction):
    """As :func:`test_popularity_equals_efa_with_a_zero_readout`, with ``exclude_context_items``:
    EFA's ``softmax(intercept)`` without the context items is the no-repeat popularity at
    ``alpha=1``."""
    train, test, metrics = _zero_readout_efa(splits, direction, exclude_context_items=True)
    counts = bl.item_counts(train)
    t = counts.targets(test)
    assert metrics["num_observations"] == len(t) == 6
    probs = bl.popularity_probs(counts, t, 1.0, exclude_context_items=True, direction=direction)
    ce = bl.cross_entropy(probs, t)
    assert metrics["nll"] == pytest.approx(ce, abs=1e-5)
    plain = bl.cross_entropy(bl.popularity_probs(counts, t, 1.0), t)
    assert ce < plain - 0.1  # the exclusion matters here


def test_no_repeat_rows(splits):
    rows = bl.item_baselines("tiny", splits, no_repeat=True)
    plain = bl.item_baselines("tiny", splits)
    assert [(r["model"], r["direction"]) for r in rows] == [(r["model"], r["direction"]) for r in plain]
    for row, base in zip(rows, plain, strict=True):
        assert row["architecture"].endswith(", no repeats (exclude_context_items)")
        assert row["architecture"].endswith(bl.NO_REPEATS) and "no repeats" in row["architecture"]
        assert "no repeats" not in base["architecture"] and "(validation)" in row["architecture"]
        assert row["options"]["exclude_context_items"] is True
        assert "exclude_context_items" not in base["options"]
        assert set(row) == set(base) and row["experiment"] == "tiny"
        # the exclusion can only help: the plain options, excluded, beat the plain row already
        assert row["val"] <= base["val"]
    # popularity: alpha chosen on validation under the exclusion, per direction
    counts = bl.item_counts(splits[0])
    val, test = counts.targets(splits[1]), counts.targets(splits[2])
    for row in (rows[0], rows[2]):

        def ce(t, alpha, direction=row["direction"]):
            return bl.cross_entropy(
                bl.popularity_probs(counts, t, alpha, exclude_context_items=True, direction=direction), t
            )

        best = min(bl.POPULARITY_GRID, key=lambda g: ce(val, g["alpha"]))  # first on a tie
        assert row["options"] == {**best, "exclude_context_items": True}
        assert row["val"] == ce(val, best["alpha"]) and row["test"] == ce(test, best["alpha"])
    markov, cooc = rows[1]["options"], rows[3]["options"]
    pop = (counts.item + markov["popularity_alpha"]) / (counts.item.sum() + markov["popularity_alpha"] * N)
    probs = bl.markov_probs(
        counts, test, markov["alpha"], markov["alpha_first"], pop, exclude_context_items=True
    )
    assert rows[1]["test"] == bl.cross_entropy(probs, test)
    assert cooc["popularity_alpha"] == rows[2]["options"]["alpha"]  # the bi popularity's alpha
    # the experiments' baselines: the plain rows, then the no-repeat rows
    both = bl.experiment_baselines("tiny")(splits, None)
    assert [{**r, "seconds": 0} for r in both] == [{**r, "seconds": 0} for r in plain + rows]


# ------------------------------------------------------------------------------------------------
# real data
def test_movielens_items(data_dir):
    splits = get("movielens_items").load(data_dir)
    test = splits[2]
    counts = bl.item_counts(splits[0])
    assert len(counts.targets(test)) == bl.num_targets(test) == int(test.mask.sum())
    rows = {(r["model"], r["direction"]): r for r in bl.item_baselines("movielens_items", splits)}
    pop = rows["popularity", "uni"]["test"]
    # below the uniform distribution over the 50 movies, above EFA's ballpark (about 3.4)
    assert 3.6 < pop < math.log(50)
    # the context helps: each baseline with a context beats popularity on the validation units
    assert rows["markov", "uni"]["val"] < rows["popularity", "uni"]["val"]
    assert rows["cooccurrence", "bi"]["val"] < rows["popularity", "bi"]["val"]
    # the no-repeat rows: the exclusion helps (never hurts) on the validation units
    no_repeat = bl.item_baselines("movielens_items", splits, no_repeat=True)
    for row in no_repeat:
        assert "no repeats" in row["architecture"]
        assert row["val"] <= rows[row["model"], row["direction"]]["val"]
