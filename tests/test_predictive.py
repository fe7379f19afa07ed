"""Held-out metrics (pyro_efa/predictive.py): per-site and per-key metrics, ranks, and data built
independently of the fit (its own key, class and row order) scored as if built from the fit's
vocabularies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_efa import (
    EFA,
    EFAConfig,
    EFAData,
    evaluate,
    fit,
    interval_coverage,
    log_likelihood,
    posterior_predictive,
    predict,
)
from pyro_efa.diagnostics import pit
from pyro_efa.errors import InputError
from pyro_efa.families import get_family

FAMILY = {
    "accel": "gaussian",
    "cyl": "poisson",
    "doors": "categorical",
    "mpg": "gaussian",
    "origin": "categorical",
}
ORIGINS = ["europe", "japan", "usa"]


def _cars(num_units: int, seed: int) -> pd.DataFrame:
    """A small mixed-type long table: two Gaussian keys on different scales, a count and a
    string-valued categorical key whose class depends on the others; a few values missing."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_units):
        origin = int(rng.integers(3))
        cyl = int(rng.poisson(4 + 2 * (origin == 2)))
        values = {
            "accel": 15 + rng.normal(0, 0.3) - 0.1 * cyl,
            "cyl": cyl,
            "mpg": 40 - 3 * cyl + rng.normal(0, 3),
            "origin": ORIGINS[origin],
            "doors": "two" if rng.random() < 0.2 + 0.1 * cyl else "four",  # 2 classes, origin 3
        }
        for slot, (key, value) in enumerate(values.items()):
            rows.append({"car": f"c{u:03d}", "slot": slot, "variable": key, "value": value})
    table = pd.DataFrame(rows).astype({"value": object})
    table.loc[rng.random(len(table)) < 0.05, "value"] = np.nan
    return table


def _build(table: pd.DataFrame, **vocabularies) -> EFAData:
    return EFAData.from_pandas(
        table, unit="car", key="variable", value="value", order="slot", missing="drop", **vocabularies
    )


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    table = _cars(160, seed=1)
    train_units = sorted(table["car"].unique())[:120]
    train = _build(table[table["car"].isin(train_units)])
    model = EFA.from_data(train, EFAConfig(family=FAMILY, direction="bi", dim=8, num_layers=1))
    fitted = fit(model, train, num_epochs=30, batch_size=32, lr=0.02, progress=False, seed=0)
    return fitted, table[~table["car"].isin(train_units)]


def test_data_built_on_its_own_scores_like_data_built_from_the_schema(mixed) -> None:
    fitted, held_out = mixed
    schema = fitted.schema
    # the same observations as another table would hold them: one key ('accel', first in the
    # fit's key order) and one class ('japan') absent, the rows shuffled
    other = held_out[(held_out["variable"] != "accel") & (held_out["value"] != "japan")]
    other = other.sample(frac=1.0, random_state=0)
    on_its_own = _build(other)
    assert on_its_own.keys.labels != schema["keys"].labels
    assert on_its_own.classes["origin"].labels != schema["classes"]["origin"].labels
    same = _build(held_out[held_out.index.isin(other.index)], keys=schema["keys"], classes=schema["classes"])
    a, b = evaluate(fitted, same), evaluate(fitted, on_its_own)
    for name in ("nll", "nll_no_base", "mse", "accuracy", "recall@10", "ndcg@10", "num_observations"):
        assert a[name] == pytest.approx(b[name], rel=1e-12), name
    per_key_a = pd.DataFrame(a["per_key"]).set_index("key")
    per_key_b = pd.DataFrame(b["per_key"]).set_index("key")
    pd.testing.assert_frame_equal(per_key_a, per_key_b.loc[per_key_a.index])
    pa = predict(fitted, same).sort_values(["unit", "key"]).reset_index(drop=True)
    pb = predict(fitted, on_its_own).sort_values(["unit", "key"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(pa.drop(columns="position"), pb.drop(columns="position"))
    assert set(pb["value"][pb["key"] == "origin"]) <= {"europe", "usa"}  # labels, not codes
    assert set(pb["prediction"][pb["key"] == "origin"]) <= set(ORIGINS)
    # pointwise functions: the same numbers per (unit, key), whatever the row order
    for fn in (log_likelihood, lambda f, d: posterior_predictive(f, d, num_samples=3)[0]):
        va, vb = (_by_unit_and_key(d, fn(fitted, d)) for d in (same, on_its_own))
        pd.testing.assert_series_equal(va, vb.loc[va.index])
    assert len(pit(fitted, on_its_own, num_samples=20)) == a["num_observations"]


def _by_unit_and_key(data: EFAData, values: torch.Tensor) -> pd.Series:
    u, p = torch.nonzero(data.target & data.mask, as_tuple=True)
    index = pd.MultiIndex.from_arrays(
        [
            [data.unit_labels[i] for i in u.tolist()],
            [data.keys.labels[k] for k in data.key_index[u, p].tolist()],
        ]
    )
    return pd.Series(values[u, p].double().numpy(), index=index).sort_index()


def test_unknown_key_or_class_is_refused_naming_it(mixed) -> None:
    fitted, held_out = mixed
    extra = pd.DataFrame([{"car": "new", "slot": 0, "variable": "hp", "value": 90.0}])
    with pytest.raises(ValueError, match="'hp'"):
        evaluate(fitted, _build(pd.concat([held_out, extra])))
    unseen = held_out.copy()
    unseen.loc[unseen["variable"] == "origin", "value"] = "mars"
    with pytest.raises(ValueError, match="mars"):
        predict(fitted, _build(unseen))


def test_per_site_and_per_key_metrics_match_the_predictions(mixed) -> None:
    fitted, held_out = mixed
    data = _build(held_out)
    metrics = evaluate(fitted, data)
    table = predict(fitted, data)
    per_key = pd.DataFrame(metrics["per_key"]).set_index("key")
    assert per_key["num_observations"].sum() == metrics["num_observations"] == len(table)
    for key, rows in table.groupby("key"):
        assert per_key.loc[key, "nll"] == pytest.approx(-rows["log_likelihood"].mean(), rel=1e-5)
        if key in ("doors", "origin"):
            assert per_key.loc[key, "accuracy"] == pytest.approx((rows["value"] == rows["prediction"]).mean())
            assert np.isnan(per_key.loc[key, "mse"])
        else:  # in the key's own units
            err = (rows["value"].astype(float) - rows["prediction"].astype(float)) ** 2
            assert per_key.loc[key, "mse"] == pytest.approx(err.mean(), rel=1e-5)
    assert fitted.efa.families[2].key_classes is not None  # 'doors' has 2 of the 3 classes
    assert set(table["prediction"][table["key"] == "doors"]) <= {"two", "four"}
    per_site = pd.DataFrame(metrics["per_site"]).set_index("family")
    assert set(per_site.index) == {"gaussian", "poisson", "categorical"}
    gaussian = per_key.loc[["accel", "mpg"]]
    pooled = (gaussian["mse"] * gaussian["num_observations"]).sum() / gaussian["num_observations"].sum()
    assert per_site.loc["gaussian", "mse"] == pytest.approx(pooled, rel=1e-9)
    # the pooled NLL is the observation-weighted mean of the per-key ones
    weighted = (per_key["nll"] * per_key["num_observations"]).sum() / metrics["num_observations"]
    assert metrics["nll"] == pytest.approx(weighted, rel=1e-9)


def test_ranking_metrics_exact_relations(mixed) -> None:
    fitted, held_out = mixed
    data = _build(held_out)
    top1, top3 = evaluate(fitted, data, k=1), evaluate(fitted, data, k=3)
    origin = pd.DataFrame(top1["per_key"]).set_index("key").loc["origin"]
    # with k = 1, recall and NDCG are the accuracy; with k = all 3 classes, recall is 1
    assert origin["recall@1"] == pytest.approx(origin["accuracy"])
    assert origin["ndcg@1"] == pytest.approx(origin["accuracy"])
    assert top3["recall@3"] == 1.0
    assert top1["accuracy"] <= top3["ndcg@3"] <= 1.0
    with pytest.raises(ValueError, match="k must be a positive integer"):
        evaluate(fitted, data, k=0)


def test_categorical_rank_against_sorting() -> None:
    torch.manual_seed(0)
    family = get_family("categorical", num_keys=2, num_categories=6, key_classes=[6, 4])
    eta = torch.randn(50, 6)
    key = torch.randint(2, (50,))
    x = torch.where(key == 1, torch.randint(4, (50,)), torch.randint(6, (50,)))
    d = family.dist(eta, key)
    rank = family.rank(d, x)
    for i in range(50):
        order = torch.argsort(d.probs[i], descending=True).tolist()
        assert rank[i] == order.index(int(x[i])) + 1
    assert get_family("gaussian").rank(get_family("gaussian").dist(eta[:, :1], key), x.float()) is None


def test_interval_coverage_of_values_drawn_from_the_model_is_its_level() -> None:
    """Targets replaced by draws from their own predictive distributions (each unit: context-only
    rows and one target, so no draw changes a context) fall inside the central 90% interval with
    probability 0.9: the share is within 4 binomial standard errors of it. A level of 0.02 holds
    few of them; a bad level is refused."""
    rng = np.random.default_rng(0)
    n = 600
    rows = [
        {"u": u, "k": k, "x": float(rng.normal(k, 1.0)), "ctx": k > 0, "o": k}
        for u in range(n)
        for k in range(3)
    ]
    data = EFAData.from_pandas(pd.DataFrame(rows), unit="u", key="k", value="x", order="o", context="ctx")
    model = EFA.from_data(data, EFAConfig(direction="bi", dim=4, num_layers=1))
    fitted = fit(model, data, num_epochs=2, batch_size=128, progress=False, seed=0)
    one = posterior_predictive(fitted, data, num_samples=1, seed=123)[0]
    replicate = dataclasses.replace(data, values=torch.where(data.target & data.mask, one, data.values))
    share = interval_coverage(fitted, replicate, level=0.9, num_samples=400, seed=7)
    assert abs(share - 0.9) < 4 * (0.9 * 0.1 / n) ** 0.5
    assert interval_coverage(fitted, replicate, level=0.02, num_samples=400, seed=7) < 0.1
    with pytest.raises(InputError, match="level"):
        interval_coverage(fitted, data, level=1.0)
