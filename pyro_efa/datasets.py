"""Data sets generated in code (no download needed).

The real data sets of the paper live in ``models/`` (they are read from a path).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["synthetic_ratings"]


def synthetic_ratings(num_users: int = 10_000, seed: int = 42) -> pd.DataFrame:
    r"""The synthetic movie-ratings data of the EFA paper, as a long table.

    Each user watches the 5 movies in a random order; the rating is Normal(mu, 1) with mu set by
    the order:

    - movie 1: 3;
    - movie 2: 1 if movie 1 was watched earlier, else 5;
    - movie 3: 1 right after movie 4, else 3;
    - movie 4: 1 right after movie 3, else 3;
    - movie 5: 5 when watched last, else 3.

    The Bayes-optimal mean squared error of every conditional is 1 in both directions.

    :param int num_users: number of users (units).
    :param int seed: numpy seed.
    :returns: columns ``user`` (1-based), ``movie`` (1..5), ``position`` (0..4), ``rating``
        and ``mu`` (the true conditional mean, for reference).
    """
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((num_users, 5)), axis=1) + 1  # movie watched at each position
    pos = np.argsort(order, axis=1)  # position of movie m+1
    prev = np.concatenate([np.zeros((num_users, 1), dtype=int), order[:, :-1]], axis=1)
    mu = np.full((num_users, 5), 3.0)  # by position
    movie = order
    mu[(movie == 2) & (pos[:, [0]] < pos[:, [1]])] = 1.0
    mu[(movie == 2) & (pos[:, [0]] > pos[:, [1]])] = 5.0
    mu[(movie == 3) & (prev == 4)] = 1.0
    mu[(movie == 4) & (prev == 3)] = 1.0
    last = np.zeros((num_users, 5), dtype=bool)
    last[:, -1] = True
    mu[(movie == 5) & last] = 5.0
    rating = mu + rng.standard_normal((num_users, 5))
    return pd.DataFrame(
        {
            "user": np.repeat(np.arange(1, num_users + 1), 5),
            "movie": movie.ravel(),
            "position": np.tile(np.arange(5), num_users),
            "rating": rating.ravel(),
            "mu": mu.ravel(),
        }
    )
