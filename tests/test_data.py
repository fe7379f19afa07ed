"""Tests for :mod:`pyro_efa.data`: long tables to padded units, subsets, splits, batches, bad input."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_efa import EFA, EFAData, Vocabulary
from pyro_efa.data import OOV_LABEL


def ratings():
    """Three users of lengths 3, 1, 2; rows shuffled; ``t`` gives the order (not 0..n-1)."""
    df = pd.DataFrame(
        {
            "user": ["bob", "ann", "bob", "cat", "bob", "cat"],
            "movie": ["m3", "m1", "m1", "m2", "m2", "m3"],
            "t": [30.0, 5.0, 10.0, 7.0, 20.0, 2.0],
            "rating": [3.0, 4.0, 1.0, 5.0, 2.0, 0.5],
        }
    )
    return df


def ragged_table(lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        {"unit": u, "key": int(rng.integers(5)), "x": float(rng.normal()), "pos": p}
        for u, n in enumerate(lengths)
        for p in range(n)
    ]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# building units


def test_shapes_masks_and_order():
    df = ratings()
    data = EFAData.from_pandas(df, "user", "movie", "rating", order="t")
    assert data.kind == "valued"
    assert data.unit_labels == ["ann", "bob", "cat"]  # sorted unit labels
    assert data.keys.labels == ["m1", "m2", "m3"]  # sorted key vocabulary
    assert data.key_index.shape == data.values.shape == data.mask.shape == data.target.shape == (3, 3)
    assert data.values.dtype == torch.get_default_dtype() and data.key_index.dtype == torch.long
    expected_mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(data.mask, expected_mask)
    assert torch.equal(data.target, expected_mask)
    assert data.lengths.tolist() == [1, 3, 2]
    assert data.max_len == 3 and len(data) == 3 and data.num_units == 3 and data.num_observations == 6
    # bob in order of t: m1 (10) -> m2 (20) -> m3 (30); cat: m3 (2) -> m2 (7)
    assert data.values[1].tolist() == [1.0, 2.0, 3.0]
    assert data.key_index[1].tolist() == [0, 1, 2]
    assert data.values[2, :2].tolist() == [0.5, 5.0]
    assert data.key_index[2, :2].tolist() == [2, 1]
    # padding is zero
    assert (data.values[~data.mask] == 0).all() and (data.key_index[~data.mask] == 0).all()
    assert data.unit_index.tolist() == [0, 1, 2]
    assert data.columns == {
        "unit": "user",
        "key": ["movie"],
        "value": "rating",
        "order": "t",
        "context": None,
    }
    assert "units=3" in repr(data)


def test_row_order_kept_without_order_column():
    df = ratings()
    data = EFAData.from_pandas(df, "user", "movie", "rating")
    assert data.values[1].tolist() == [3.0, 1.0, 2.0]  # bob's rows as they appear
    assert data.values[2, :2].tolist() == [5.0, 0.5]


def test_numeric_unit_labels_sort_as_numbers():
    df = pd.DataFrame({"u": [10, 2, 10, 2], "k": ["a", "a", "b", "b"], "x": [1.0, 2.0, 3.0, 4.0]})
    data = EFAData.from_pandas(df, "u", "k", "x")
    assert data.unit_labels == [2, 10]
    assert data.values.tolist() == [[2.0, 4.0], [1.0, 3.0]]


def test_numeric_single_key_has_features():
    df = pd.DataFrame({"u": [1, 1, 2], "k": [30, 4, 100], "x": [1.0, 2.0, 3.0]})
    data = EFAData.from_pandas(df, "u", "k", "x")
    assert data.keys.labels == [4, 30, 100]
    assert data.keys.features.tolist() == [[4.0], [30.0], [100.0]]
    assert data.key_index.tolist() == [[1, 0], [2, 0]]


def test_items_data():
    df = pd.DataFrame(
        {
            "basket": [1, 1, 1, 2, 2],
            "product": ["milk", "apple", "bread", "apple", "zucchini"],
            "rank": [2, 3, 1, 1, 2],
        }
    )
    data = EFAData.from_pandas(df, "basket", "product", order="rank")
    assert data.kind == "items"
    assert data.items.labels == ["apple", "bread", "milk", "zucchini"]
    assert data.keys.labels == ["position"]
    assert (data.key_index == 0).all()
    assert data.values.tolist() == [[1.0, 2.0, 0.0], [0.0, 3.0, 0.0]]  # bread, milk, apple | apple, zucchini
    assert data.mask.tolist() == [[True, True, True], [True, True, False]]
    out = data.to_pandas()
    assert out["value"].tolist() == ["bread", "milk", "apple", "apple", "zucchini"]
    assert "items=4" in repr(data)
    with pytest.raises(ValueError, match="one item column"):
        EFAData.from_pandas(df, "basket", ["product", "rank"])


def test_multi_column_keys_with_features():
    df = pd.DataFrame(
        {
            "day": [1, 1, 1, 2, 2],
            "lat": [40.0, 30.0, 40.0, 30.0, 40.0],
            "lon": [-70.0, -90.0, -80.0, -90.0, -70.0],
            "temp": [50.0, 70.0, 55.0, 72.0, 48.0],
        }
    )
    data = EFAData.from_pandas(df, "day", ["lat", "lon"], "temp")
    assert data.keys.labels == [(30.0, -90.0), (40.0, -80.0), (40.0, -70.0)]
    assert data.keys.features.dtype == torch.float64
    assert data.keys.features.tolist() == [[30.0, -90.0], [40.0, -80.0], [40.0, -70.0]]
    assert data.key_index.tolist() == [[2, 0, 1], [0, 2, 0]]
    assert data.columns["key"] == ["lat", "lon"]
    model = EFA.from_data(data, dim=4)
    assert model.config.key_embedding == "mlp" and not hasattr(model, "alpha")
    df["name"] = "x"
    with pytest.raises(ValueError, match="numeric.*'name'"):
        EFAData.from_pandas(df, "day", ["lat", "name"], "temp")


def test_context_column():
    df = ratings()
    df["lag"] = [False, False, True, False, False, True]
    data = EFAData.from_pandas(df, "user", "movie", "rating", order="t", context="lag")
    assert torch.equal(data.mask, EFAData.from_pandas(df, "user", "movie", "rating", order="t").mask)
    # bob: t=10 (context), 20, 30; cat: t=2 (context), 7
    assert data.target.tolist() == [[True, False, False], [False, True, True], [False, True, False]]
    assert data.num_observations == 4
    df["lag"] = df["lag"].astype(int)
    with pytest.raises(ValueError, match="'lag'.*boolean"):
        EFAData.from_pandas(df, "user", "movie", "rating", context="lag")


def test_to_pandas_round_trip():
    df = ratings()
    data = EFAData.from_pandas(df, "user", "movie", "rating", order="t")
    back = data.to_pandas()
    assert len(back) == len(df)
    again = EFAData.from_pandas(back, "unit", "key", "value", order="position")
    for name in ("key_index", "values", "mask"):
        assert torch.equal(getattr(again, name), getattr(data, name))


def test_vocabulary_dict_round_trip():
    vocab = Vocabulary(labels=[(1.0, 2.0), (3.0, 4.0)], features=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    back = Vocabulary.from_dict(vocab.to_dict())
    assert back.labels == vocab.labels and not back.oov
    assert torch.equal(back.features, vocab.features.double())
    assert back.lookup([(3.0, 4.0)], "k").tolist() == [1]


# ----------------------------------------------------------------------------------------------
# subset, split, batches


def test_subset():
    data = EFAData.from_pandas(ratings(), "user", "movie", "rating", order="t")
    sub = data.subset([2, 0])
    assert sub.unit_labels == ["cat", "ann"]
    assert sub.max_len == 2  # trimmed to the longest unit of the subset
    assert torch.equal(sub.values, data.values[[2, 0], :2])
    assert sub.unit_index.tolist() == [2, 0] and sub.num_units == 3  # a minibatch of data
    own = data.subset(torch.tensor([2, 0]), reindex=True)
    assert own.unit_index.tolist() == [0, 1] and own.num_units == 2


def test_split_by_unit():
    data = EFAData.from_pandas(ragged_table([1, 2, 3, 4, 5, 6, 7, 8]), "unit", "key", "x", order="pos")
    parts = data.split((0.5, 0.25, 0.25), seed=3)
    assert [len(p) for p in parts] == [4, 2, 2]
    labels = [set(p.unit_labels) for p in parts]
    assert set.union(*labels) == set(data.unit_labels)
    assert sum(len(s) for s in labels) == len(data)  # disjoint
    for p in parts:
        assert p.num_units == len(p) and p.unit_index.tolist() == list(range(len(p)))
        for k, label in enumerate(p.unit_labels):  # whole units, unchanged
            u = data.unit_labels.index(label)
            n = int(data.lengths[u])
            assert torch.equal(p.values[k, :n], data.values[u, :n]) and int(p.lengths[k]) == n
    again = data.split((0.5, 0.25, 0.25), seed=3)
    assert [q.unit_labels for q in again] == [p.unit_labels for p in parts]
    other = data.split((0.5, 0.25, 0.25), seed=4)
    assert [q.unit_labels for q in other] != [p.unit_labels for p in parts]
    with pytest.raises(ValueError, match="fractions"):
        data.split((0.5, -0.5))


@pytest.mark.parametrize(
    "shuffle, bucket",
    [
        pytest.param(False, False, id="plain"),
        pytest.param(False, True, id="bucket"),
        pytest.param(True, True, id="shuffle-bucket"),
        pytest.param(True, False, id="shuffle"),
    ],
)
def test_batches_cover_every_unit_once(shuffle, bucket):
    data = EFAData.from_pandas(ragged_table([5, 1, 7, 2, 2, 9, 1, 3, 4, 6, 8]), "unit", "key", "x")
    gen = torch.Generator().manual_seed(0)
    batches = list(data.batches(3, shuffle=shuffle, generator=gen, bucket=bucket))
    seen = torch.cat([b.unit_index for b in batches]).tolist()
    assert sorted(seen) == list(range(len(data)))
    for b in batches:
        assert len(b) <= 3 and b.num_units == len(data)
        assert b.max_len == int(b.lengths.max())
        for k, u in enumerate(b.unit_index.tolist()):
            assert b.unit_labels[k] == data.unit_labels[u]
            assert torch.equal(b.values[k], data.values[u, : b.max_len])


def test_bucketing_reduces_padding():
    lengths = np.random.default_rng(1).integers(1, 30, size=60).tolist()
    data = EFAData.from_pandas(ragged_table(lengths), "unit", "key", "x")

    def waste(bucket):
        gen = torch.Generator().manual_seed(0)
        return sum(
            b.mask.numel() - int(b.mask.sum())
            for b in data.batches(6, shuffle=True, generator=gen, bucket=bucket)
        )

    assert waste(True) < 0.5 * waste(False)


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "change, args, match",
    [
        pytest.param(None, dict(value="score"), r"\['score'\] not in the table", id="missing-value-column"),
        pytest.param(None, dict(order="when"), r"\['when'\]", id="missing-order-column"),
        pytest.param(lambda df: df.iloc[:0], {}, "empty", id="empty-table"),
        pytest.param(
            lambda df: df.assign(rating=[3.0, 4.0, np.nan, 5.0, 2.0, 0.5]),
            {},
            "'rating' has 1 missing value.*'bob'.*missing='drop'",
            id="nan-value",
        ),
        pytest.param(
            lambda df: df.assign(rating=[3.0, 4.0, 1.0, np.inf, 2.0, 0.5]),
            {},
            "'rating'.*'cat'.*inf",
            id="inf-value",
        ),
        pytest.param(
            lambda df: df.assign(t=[30.0, 5.0, 10.0, 7.0, 10.0, 2.0]),
            dict(order="t"),
            "unit 'bob'.*'t' = 10.0",
            id="duplicate-order",
        ),
        pytest.param(
            lambda df: df.assign(t=[30.0, 5.0, np.nan, 7.0, 20.0, 2.0]),
            dict(order="t"),
            "'t'.*'bob'",
            id="nan-order",
        ),
        pytest.param(
            lambda df: df.assign(user=["bob", None, "bob", "cat", "bob", "cat"]),
            {},
            "'user' has a missing value",
            id="missing-unit",
        ),
        pytest.param(
            lambda df: df.assign(movie=["m3", "m1", None, "m2", "m2", "m3"]),
            {},
            "'movie' has a missing value",
            id="missing-key",
        ),
        pytest.param(None, dict(ties="maybe"), "ties", id="bad-ties"),
        pytest.param(None, dict(key=None), "key column is required", id="no-key"),
    ],
)
def test_bad_input(change, args, match):
    df = ratings()
    if change is not None:
        df = change(df)
    kwargs = dict(unit="user", key="movie", value="rating")
    kwargs.update(args)
    with pytest.raises(ValueError, match=match):
        EFAData.from_pandas(df, **kwargs)


def test_not_a_dataframe():
    with pytest.raises(TypeError, match="DataFrame"):
        EFAData.from_pandas(ratings().to_dict(), "user", "movie", "rating")


def test_ties_keep_row_order():
    df = ratings().assign(t=[30.0, 5.0, 10.0, 7.0, 10.0, 2.0])  # bob: m1 and m2 both at t = 10
    data = EFAData.from_pandas(df, "user", "movie", "rating", order="t", ties="keep")
    assert data.values[1].tolist() == [1.0, 2.0, 3.0]  # m1 before m2, as in the rows
    flipped = EFAData.from_pandas(df.iloc[::-1], "user", "movie", "rating", order="t", ties="keep")
    assert flipped.values[1].tolist() == [2.0, 1.0, 3.0]


def test_unknown_keys_with_fitted_vocabulary():
    train = EFAData.from_pandas(ratings(), "user", "movie", "rating")
    new = pd.DataFrame({"user": ["dan", "dan"], "movie": ["m2", "m9"], "rating": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"column 'movie'.*\['m9'\].*oov=True"):
        EFAData.from_pandas(new, "user", "movie", "rating", keys=train.keys)
    known = EFAData.from_pandas(new.iloc[:1], "user", "movie", "rating", keys=train.keys)
    assert known.keys is train.keys and known.key_index.tolist() == [[1]]


def test_oov_row():
    train = EFAData.from_pandas(ratings(), "user", "movie", "rating", oov=True)
    assert train.keys.labels == ["m1", "m2", "m3", OOV_LABEL] and train.keys.oov
    assert not (train.key_index == 3).any()
    new = pd.DataFrame(
        {"user": ["dan", "dan", "dan"], "movie": ["m2", "m9", "m7"], "rating": [1.0, 2.0, 3.0]}
    )
    test = EFAData.from_pandas(new, "user", "movie", "rating", keys=train.keys)
    assert test.key_index.tolist() == [[1, 3, 3]]
    # a model sized on the training data scores the OOV keys
    model = EFA.from_data(train, dim=4)
    eta = model.natural_params(test)
    assert torch.isfinite(eta).all()
    # item sequences: unknown items map to the OOV item
    baskets = pd.DataFrame({"b": [1, 1, 2], "item": ["x", "y", "x"]})
    items = EFAData.from_pandas(baskets, "b", "item", oov=True)
    assert items.items.labels == ["x", "y", OOV_LABEL]
    later = EFAData.from_pandas(
        pd.DataFrame({"b": [5, 5], "item": ["y", "q"]}), "b", "item", items=items.items
    )
    assert later.values.tolist() == [[1.0, 2.0]]
    # numeric keys: the OOV row has zero features
    num = EFAData.from_pandas(
        pd.DataFrame({"u": [1, 1], "k": [3, 5], "x": [1.0, 2.0]}), "u", "k", "x", oov=True
    )
    assert num.keys.features.tolist() == [[3.0], [5.0], [0.0]]


def test_values_are_finite_floats_in_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = EFAData.from_pandas(ratings(), "user", "movie", "rating")
    finally:
        torch.set_default_dtype(old)
    assert data.values.dtype == torch.float64
    bools = ratings().assign(rating=[True, False, True, True, False, False])
    data = EFAData.from_pandas(bools, "user", "movie", "rating")
    assert data.values.dtype == torch.float32 and math.isclose(float(data.values.sum()), 3.0)


def test_class_labels_need_a_family_of_class_labels():
    """Strings in the value column are class labels of their keys (a vocabulary per key); a model
    that gives such a key a family of numbers is refused, naming the key and the family to use."""
    df = ratings().assign(rating=list("abcdef"))
    data = EFAData.from_pandas(df, unit="user", key="movie", value="rating")
    assert set(data.classes) == set(data.keys.labels)
    with pytest.raises(ValueError, match="holds class labels.*categorical.*'gaussian'"):
        EFA.from_data(data)
