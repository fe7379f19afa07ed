"""The per-movie baselines of the MovieLens ratings and the choice of their family by LOO
(``models/movielens.py``): hand formulas on tiny hand-built data, the full log pmf of each family
against SciPy, and a smoke run of :func:`family_choice`. The real-data test skips when
``../shared/data`` (or $PYRO_EFA_DATA) is absent.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pyro.distributions import Poisson
from scipy import stats

from pyro_efa import EFAData, evaluate, fit
from pyro_efa.families import PoissonFamily
from pyro_efa.models.base import SMOKE_MODEL
from pyro_efa.models.movielens import (
    PSEUDO_COUNTS,
    RATING_FAMILIES,
    RATINGS,
    family_choice,
    load_ratings,
    movie_frequency_baseline,
    movie_mean_baseline,
)
from pyro_efa.scoring import Scorer

RECORD_KEYS = {
    "experiment", "direction", "model", "seed", "guide", "metric", "architecture", "recommended",
    "val", "test", "epochs", "best_epoch", "seconds", "options",
}  # fmt: skip

# train users 0-2: movie a rated 0, 2, 2, b rated 1, d rated 0 (global mean 1); validation user 3:
# b 0 (context only: not scored), a 2, d 1; test user 4: a 1, b 2, c 2 (c unseen in training)
ROWS = [
    (0, "a", 0, 0, False), (0, "b", 1, 1, False),
    (1, "a", 0, 2, False), (1, "d", 1, 0, False),
    (2, "a", 0, 2, False),
    (3, "b", 0, 0, True), (3, "a", 1, 2, False), (3, "d", 2, 1, False),
    (4, "a", 0, 1, False), (4, "b", 1, 2, False), (4, "c", 2, 2, False),
]  # fmt: skip
TRAIN = {"a": (4.0, 3), "b": (1.0, 1), "d": (0.0, 1)}  # (sum, count) of y per movie
GLOBAL = 1.0
VAL = [("a", 2), ("d", 1)]
TEST = [("a", 1), ("b", 2), ("c", 2)]


@pytest.fixture
def hand_splits():
    df = pd.DataFrame(ROWS, columns=["user", "movie", "t", "y", "ctx"])
    data = EFAData.from_pandas(df, unit="user", key="movie", value="y", order="t", context="ctx")
    return (
        data.subset([0, 1, 2], reindex=True),
        data.subset([3], reindex=True),
        data.subset([4], reindex=True),
    )


def _mean(movie: str, c: float) -> float:
    s, n = TRAIN.get(movie, (0.0, 0))
    return (s + c * GLOBAL) / (n + c) if n + c > 0 else GLOBAL


def _nll_no_base(rows, c: float) -> float:
    """The library's nll_no_base: -(Poisson log_prob - the family's log base measure), averaged."""
    y = torch.tensor([float(v) for _, v in rows], dtype=torch.float64)
    mu = torch.tensor([_mean(m, c) for m, _ in rows], dtype=torch.float64)
    return -float((Poisson(mu).log_prob(y) - PoissonFamily().log_base_measure(y)).mean())


def test_movie_mean_matches_the_hand_formula(hand_splits):
    grid = (0.0, 1.0, 3.0, 10.0)
    records = movie_mean_baseline(hand_splits, pseudo_counts=grid, metrics=("nll_no_base", "nll"))
    expected_val = {c: _nll_no_base(VAL, c) for c in grid}
    best = min(grid, key=lambda c: expected_val[c])
    assert expected_val[0.0] == math.inf  # c = 0: movie d's mean is 0, and it is rated 1
    assert best == 3.0  # an interior choice: the grid matters
    assert [(r["direction"], r["metric"]) for r in records] == [
        ("uni", "nll_no_base"), ("bi", "nll_no_base"), ("uni", "nll"), ("bi", "nll"),
    ]  # fmt: skip
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["model"] == "movie_mean" and r["guide"] == "-" and r["seed"] == 0
        assert r["epochs"] == 0 and r["best_epoch"] is None and r["recommended"] is True
        assert r["options"]["pseudo_count"] == best
        assert r["options"]["val_nll_no_base"] == pytest.approx([expected_val[c] for c in grid])
        log_fact = {
            "val": np.mean([math.lgamma(v + 1) for _, v in VAL]),
            "test": np.mean([math.lgamma(v + 1) for _, v in TEST]),
        }
        extra = log_fact if r["metric"] == "nll" else {"val": 0.0, "test": 0.0}
        assert r["val"] == pytest.approx(_nll_no_base(VAL, best) + extra["val"])
        assert r["test"] == pytest.approx(_nll_no_base(TEST, best) + extra["test"])


def test_movie_frequency_matches_the_hand_formula(hand_splits):
    counts = {"a": [1, 0, 2], "b": [0, 1, 0], "d": [1, 0, 0]}
    overall = np.array([2, 1, 2]) / 5

    def nll(rows, c):
        out = []
        for movie, v in rows:
            n = np.array(counts.get(movie, [0, 0, 0]), dtype=float)
            p = (n + c * overall) / (n.sum() + c) if n.sum() + c > 0 else overall
            out.append(-math.log(p[v]) if p[v] > 0 else math.inf)
        return float(np.mean(out))

    grid = (0.0, 0.5, 2.0, 8.0)
    records = movie_frequency_baseline(hand_splits, pseudo_counts=grid)
    best = min(grid, key=lambda c: nll(VAL, c))
    assert len(records) == 2 and {r["direction"] for r in records} == {"uni", "bi"}
    for r in records:
        assert set(r) == RECORD_KEYS and r["metric"] == "nll" and r["model"] == "movie_frequency"
        assert r["options"]["pseudo_count"] == best
        assert r["val"] == pytest.approx(nll(VAL, best))
        assert r["test"] == pytest.approx(nll(TEST, best))


def _tiny_ratings(
    num_users: int = 60, num_movies: int = 8, seed: int = 0
) -> tuple[EFAData, EFAData, EFAData]:
    """Ratings 0-2 of a few movies per user (each movie its own probabilities), split by unit."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3), size=num_movies)
    rows = []
    for u in range(num_users):
        for t, m in enumerate(rng.choice(num_movies, size=rng.integers(2, 7), replace=False)):
            rows.append((u, int(m), t, int(rng.choice(3, p=probs[m]))))
    df = pd.DataFrame(rows, columns=["user", "movie", "t", "y"])
    data = EFAData.from_pandas(df, unit="user", key="movie", value="y", order="t")
    return data.split((0.5, 0.25, 0.25), seed=0)  # type: ignore[return-value]


SCIPY_LOGPMF = {
    "poisson": lambda y, eta: stats.poisson.logpmf(y, np.exp(eta[:, 0])),
    "binomial": lambda y, eta: stats.binom.logpmf(y, 2, 1 / (1 + np.exp(-eta[:, 0]))),
    "categorical": lambda y, eta: (eta - np.logaddexp.reduce(eta, axis=1, keepdims=True))[
        np.arange(len(y)), y
    ],
}


@pytest.mark.parametrize("family", list(RATING_FAMILIES))
def test_full_nll_is_the_log_pmf_on_the_counting_measure(family):
    """evaluate()["nll"] is -log p(y) with log y! (Poisson) and the binomial coefficient included."""
    train, val, test = splits = _tiny_ratings()
    model = RATINGS.model(
        "efa", "uni", splits, family=family, family_options={family: RATING_FAMILIES[family]}, **SMOKE_MODEL
    )
    fitted = fit(
        model,
        train,
        guide="normal",
        val_data=val,
        options=RATINGS.fit_options("efa", "uni", num_epochs=1),
        progress=False,
    )
    scorer = Scorer(fitted, test)
    eta = scorer.score(scorer.latents(plug_in=True), eta=True).eta
    m = test.target & test.mask
    y = test.values[m].long().numpy()
    expected = -SCIPY_LOGPMF[family](y, eta[m].double().numpy()).mean()
    got = evaluate(fitted, test)
    assert got["nll"] == pytest.approx(expected, rel=1e-5)
    if family == "poisson":  # nll_no_base leaves out log y!
        assert got["nll"] - got["nll_no_base"] == pytest.approx(
            np.mean([math.lgamma(v + 1) for v in y]), rel=1e-5
        )
    if family == "categorical":  # counting measure already: no base term
        assert got["nll_no_base"] == pytest.approx(got["nll"])


def test_family_choice_smoke():
    pytest.importorskip("arviz")
    records = family_choice(_tiny_ratings(), "bi", seed=0, smoke=True)
    assert [r["model"] for r in records] == [f"efa ({f})" for f in RATING_FAMILIES]
    assert sum(r["chosen"] for r in records) == 1
    chosen = next(r for r in records if r["chosen"])
    assert chosen["loo_val"] == max(r["loo_val"] for r in records) and chosen["loo_rank"] == 0
    assert sorted(r["loo_rank"] for r in records) == [0, 1, 2]
    for r in records:
        assert RECORD_KEYS <= set(r) and r["metric"] == "nll" and r["guide"] == "normal"
        assert r["val"] == r["val_full_nll"] and r["test"] == r["test_full_nll"]
        assert 0.0 <= r["coverage90"] <= 1.0 and math.isfinite(r["test_full_nll_samples"])
        assert (r["test_nll_no_base"] is None) == (r["model"] != "efa (poisson)")
    assert torch.get_num_threads() >= 1


def test_movie_mean_on_the_real_ratings(data_dir):
    splits = load_ratings(data_dir)
    records = movie_mean_baseline(splits)
    uni, bi = records
    assert uni["val"] == bi["val"] and uni["test"] == bi["test"]
    assert uni["options"]["pseudo_count"] in PSEUDO_COUNTS
    # the same numbers from pandas: per-movie means of all training ratings, shrunk
    train, _, test = splits
    frame = lambda d: pd.DataFrame(  # noqa: E731
        {
            "movie": [d.keys.labels[k] for k in d.key_index[d.mask].tolist()],
            "y": d.values[d.mask].double().numpy(),
        }
    )
    tr, te = frame(train), frame(test)
    c, g = uni["options"]["pseudo_count"], tr["y"].mean()
    by_movie = tr.groupby("movie")["y"].agg(["sum", "count"])
    mu = te["movie"].map((by_movie["sum"] + c * g) / (by_movie["count"] + c)).fillna(g)
    assert uni["test"] == pytest.approx(float((mu - te["y"] * np.log(mu)).mean()))
    assert 0.9 < uni["test"] < 1.0
