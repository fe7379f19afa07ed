"""models/composed.py: EFA plus a linear term of the other observations, a composed Pyro model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

from pyro_efa import EFA, EFAConfig, EFAData, evaluate, fit
from pyro_efa.errors import InputError
from pyro_efa.models.composed import EFAPlusLinear

KEYS = ["a", "b", "c", "d"]


def _data(num_units: int = 6, seed: int = 0, drop: bool = True) -> EFAData:
    """Units with each key at most once (one key left out of some units), values on their own scales."""
    rng = np.random.default_rng(seed)
    rows = [
        {"u": u, "k": k, "x": float(10 * i + rng.normal()), "o": i}
        for u in range(num_units)
        for i, k in enumerate(KEYS)
        if not (drop and u % 3 == 0 and k == "c")
    ]
    return EFAData.from_pandas(pd.DataFrame(rows), unit="u", key="k", value="x", order="o")


def _model(data: EFAData, direction: str = "bi") -> EFAPlusLinear:
    torch.manual_seed(0)
    efa = EFA.from_data(data, EFAConfig(direction=direction, dim=4, num_layers=1, name="efa"))
    return EFAPlusLinear(efa, prior_scale=0.5)


def test_linear_term_equals_its_closed_form() -> None:
    data = _data()
    model = _model(data)
    pyro.set_rng_seed(1)
    with pyro.poutine.trace() as tr:
        lin = model.linear(data)[..., 0]
    W = tr.trace.nodes["linear.W"]["value"]
    center, scale = model.linear.center, model.linear.scale
    for u in range(data.num_units):
        keys = data.key_index[u][data.mask[u]].tolist()
        z = {k: float((data.values[u, j] - center[k]) / scale[k]) for j, k in enumerate(keys)}
        for i, k in enumerate(keys):
            expected = sum(float(W[k, other]) * value for other, value in z.items() if other != k)
            assert float(lin[u, i]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_natural_parameter_does_not_depend_on_its_own_value() -> None:
    """The composed ``eta_i`` (EFA + linear term) has zero gradient in ``x_i`` and a non-zero
    one in the other values of the unit."""
    data = _data(num_units=3)
    model = _model(data)
    values = data.values.clone().requires_grad_(True)
    batch = dataclasses.replace(data, values=values)
    pyro.set_rng_seed(2)
    eta = model.efa.natural_params(batch) + model.linear(batch)
    for u in range(data.num_units):
        n = int(data.mask[u].sum())
        for i in range(n):
            (grad,) = torch.autograd.grad(eta[u, i, 0], values, retain_graph=True)
            assert grad[u, i] == 0
            assert grad[u, :n].abs().sum() > 0


def test_fit_and_evaluate_through_the_library() -> None:
    """MAP learns the linear term: on data where key "b" is key "a" plus 5 and small noise, the
    weight of "a" in the term of "b" grows from 0 (its prior mean) toward the slope, and the
    library scores the composed model (validation, evaluate)."""

    def tied(num_units: int, seed: int) -> EFAData:
        rng = np.random.default_rng(seed)
        rows = []
        for u in range(num_units):
            a = float(rng.normal(0, 3))
            values = {"a": a, "b": a + 5 + float(rng.normal(0, 0.1)), "c": float(rng.normal())}
            rows += [{"u": u, "k": k, "x": x, "o": i} for i, (k, x) in enumerate(values.items())]
        return EFAData.from_pandas(pd.DataFrame(rows), unit="u", key="k", value="x", order="o")

    train, test = tied(200, 1), tied(50, 2)
    fitted = fit(
        _model(train), train, val_data=test, num_epochs=30, batch_size=50, lr=0.05, progress=False, seed=0
    )
    W = fitted.median(train)["linear.W"]
    a, b = train.keys.labels.index("a"), train.keys.labels.index("b")
    assert W[b, a] > 1.0  # standardised a (sd 3) -> b in its units: about 3 at convergence
    assert evaluate(fitted, test)["mse"] < 1.0  # the marginal variance of b is 9


def test_refuses_unidirectional_models_and_repeated_keys() -> None:
    with pytest.raises(InputError, match="bidirectional"):
        _model(_data(), direction="uni")
    rows = [{"u": 0, "k": "a", "x": 1.0, "o": 0}, {"u": 0, "k": "a", "x": 2.0, "o": 1}]
    rows += [{"u": 1, "k": k, "x": 1.0, "o": i} for i, k in enumerate(KEYS)]
    repeated = EFAData.from_pandas(pd.DataFrame(rows), unit="u", key="k", value="x", order="o")
    model = _model(_data())
    with pytest.raises(InputError, match="unit 0 has two observations"):
        fit(model, repeated, num_epochs=1, progress=False)


def test_trains_on_the_efa_target_fraction() -> None:
    """The composed model passes the EFA's random target subset and weights on: in training a
    per-target EFA with ``target_fraction=0.5`` scores ceil(n / 2) targets of each unit, each
    weighted n / m; in evaluation every target, weight 1."""
    data = _data()
    torch.manual_seed(0)
    config = EFAConfig(direction="bi", dim=4, num_layers=2, target_fraction=0.5, name="efa")
    model = EFAPlusLinear(EFA.from_data(data, config), prior_scale=0.5)
    n = (data.target & data.mask).sum(-1)
    m = torch.ceil(n / 2)
    for training, counts in ((True, m), (False, n)):
        model.train(training)
        tr = pyro.poutine.trace(model).get_trace(data)
        tr.compute_log_prob()
        site = tr.nodes["efa.x"]
        torch.testing.assert_close((site["log_prob"] != 0).sum(-1), counts.long())
        if training:  # each unit's log likelihood weighted n / m (unbiased)
            scale = torch.as_tensor(site["scale"]).expand_as(data.mask)[:, 0]
            torch.testing.assert_close(scale, (n / m).to(scale.dtype))
