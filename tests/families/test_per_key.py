"""Shared or per-key nuisance parameters: the ``per_key="auto"`` rule, resolved from the training
data and stored in the configuration; the paper's models pinned to a shared scale; and the NLL
effect of per-key Gaussian scales on mixed-type data."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_efa
from pyro_efa import EFA, EFAData
from pyro_efa.cli import main
from pyro_efa.families import (
    FAMILIES,
    PER_KEY_MIN_COUNT,
    GaussianFamily,
    get_family,
    per_key_flag,
    resolve_per_key,
)
from pyro_efa.models import EXPERIMENTS
from pyro_efa.models import synthetic as synthetic_experiment

SMALL = dict(dim=8, num_layers=1, num_heads=1, head_dim=8)
NUISANCE = {"gaussian": "scale", "negative_binomial": "concentration", "gamma": "concentration"}
NUISANCE["tweedie"] = "dispersion"


def test_resolve_rule():
    counts = torch.tensor([PER_KEY_MIN_COUNT, 50, 0])  # a key without training observations
    assert resolve_per_key(GaussianFamily, None, counts) is True
    assert resolve_per_key(GaussianFamily, "auto", torch.tensor([PER_KEY_MIN_COUNT - 1, 50])) is False
    assert resolve_per_key(GaussianFamily, None, torch.tensor([0, 0])) is False
    # nothing to resolve: given True / False, or a family without "auto" default
    assert resolve_per_key(GaussianFamily, False, counts) is None
    assert resolve_per_key(FAMILIES["poisson"], None, counts) is None
    for name in NUISANCE:
        assert resolve_per_key(FAMILIES[name], None, counts) is True, name


def test_flag_and_unresolved_auto_share():
    assert per_key_flag("auto") is False and per_key_flag(True) is True and per_key_flag(0) is False
    for bad in ("true", "yes", 2, None):
        with pytest.raises(ValueError, match="per_key must be True, False or 'auto'"):
            per_key_flag(bad)
    for name, attr in NUISANCE.items():
        # built without data (e.g. a fit saved before "auto"): shared, as before
        assert getattr(get_family(name, num_keys=3), attr).shape == (), name
        assert getattr(get_family(name, num_keys=3, per_key="auto"), attr).shape == (), name


def _table(counts: dict[str, int], seed: int = 0) -> EFAData:
    """One row per (unit, key) for the first ``counts[key]`` units; positive integer values (valid
    for every family with a nuisance parameter)."""
    rng = np.random.default_rng(seed)
    rows = [
        {"u": u, "k": key, "x": float(rng.poisson(3.0) + 1)} for key, n in counts.items() for u in range(n)
    ]
    return EFAData.from_pandas(pd.DataFrame(rows), "u", "k", "x")


@pytest.mark.parametrize("name", sorted(NUISANCE))
def test_from_data_resolves_and_stores(name):
    attr = NUISANCE[name]
    rich = _table({"a": 25, "b": 40})
    model = EFA.from_data(rich, family=name, **SMALL)
    assert model.config.family_options[name]["per_key"] is True
    assert getattr(model.families[0], attr).shape == (2,)
    thin = _table({"a": 25, "b": 3})  # one key too thin for its own parameter
    model = EFA.from_data(thin, family=name, **SMALL)
    assert model.config.family_options[name]["per_key"] is False
    assert getattr(model.families[0], attr).shape == ()
    # given values win; "auto" given explicitly is resolved too
    forced = EFA.from_data(thin, family=name, family_options={name: {"per_key": True}}, **SMALL)
    assert getattr(forced.families[0], attr).shape == (2,)
    shared = EFA.from_data(rich, family=name, family_options={name: {"per_key": False}}, **SMALL)
    assert getattr(shared.families[0], attr).shape == ()
    auto = EFA.from_data(rich, family=name, family_options={name: {"per_key": "auto"}}, **SMALL)
    assert auto.config.family_options[name]["per_key"] is True


def test_families_without_nuisance_parameter_keep_their_options():
    data = _table({"a": 30, "b": 30})
    assert EFA.from_data(data, family="poisson", **SMALL).config.family_options == {}


def test_saved_fit_reloads_with_its_resolved_option(tmp_path):
    data = _table({"a": 30, "b": 30})
    fitted = pyro_efa.fit(EFA.from_data(data, **SMALL), data, num_epochs=1, progress=False)
    pyro_efa.save(fitted, tmp_path / "fit")
    stored = json.loads((tmp_path / "fit" / "config.json").read_text())["model"]["family_options"]
    assert stored == {"gaussian": {"per_key": True}}
    loaded = pyro_efa.load(tmp_path / "fit")
    assert loaded.efa.config == fitted.efa.config
    torch.testing.assert_close(loaded.efa.families[0].scale, fitted.efa.families[0].scale)
    # a configuration without the option (a fit saved before "auto") builds the shared scale
    old = EFA(fitted.efa.config.replace(family_options={}))
    assert old.families[0].scale.shape == ()


def test_paper_experiments_keep_the_shared_scale():
    for exp in EXPERIMENTS.values():
        for direction in exp.directions:
            for model in ("efa", "efe"):
                options = exp.config(model, direction).family_options
                if exp.kind == "items" or exp.name.startswith("movielens"):
                    assert "gaussian" not in options, (exp.name, model)  # Poisson / categorical
                else:
                    assert options["gaussian"]["per_key"] is False, (exp.name, model)
    exp = EXPERIMENTS["synthetic"]
    override = exp.config("efa", "uni", family_options={"gaussian": {"per_key": True}})
    assert override.family_options["gaussian"]["per_key"] is True  # an explicit choice wins
    splits = synthetic_experiment.load(num_users=200)
    assert exp.model("efa", "uni", splits).families[0].scale.shape == ()
    assert EFA.from_data(splits[0]).families[0].scale.shape == (5,)  # the library's default


def _mixed_table(num_days: int = 200, seed: int = 0) -> pd.DataFrame:
    """Two Gaussian keys on very different scales (say a humidity ratio and a wind speed): sd 0.1
    around 5 and sd 10 around 50, one of each per day."""
    rng = np.random.default_rng(seed)
    rows = []
    for day in range(num_days):
        rows.append({"day": day, "var": "calm", "x": 5.0 + 0.1 * rng.standard_normal(), "t": 0})
        rows.append({"day": day, "var": "wild", "x": 50.0 + 10.0 * rng.standard_normal(), "t": 1})
    return pd.DataFrame(rows)


def _nll_per_key(per_key: bool | str) -> dict[str, float]:
    data = EFAData.from_pandas(_mixed_table(), "day", "var", "x", order="t")
    train, test = data.split((0.75, 0.25), seed=0)
    options = {} if per_key == "auto" else {"gaussian": {"per_key": per_key}}
    model = EFA.from_data(train, family_options=options, **SMALL)
    fitted = pyro_efa.fit(model, train, num_epochs=10, batch_size=32, progress=False, seed=0)
    metrics = pyro_efa.evaluate(fitted, test)
    return {"pooled": metrics["nll"], **{r["key"]: r["nll"] for r in metrics["per_key"]}}


def test_per_key_default_improves_the_low_variance_key():
    auto, shared = _nll_per_key("auto"), _nll_per_key(False)
    own_mean = math.log(0.1) + 0.5 * math.log(2 * math.pi) + 0.5  # N(5, 0.1) scored by itself
    # with one shared scale (about sqrt((0.1^2 + 10^2) / 2) = 7) the calm key scores far worse
    # than its own mean would; with its own scale it scores about as well
    assert shared["calm"] > own_mean + 2
    assert auto["calm"] < shared["calm"] - 2
    assert auto["calm"] == pytest.approx(own_mean, abs=0.3)
    assert auto["wild"] < shared["wild"] + 0.05 and auto["pooled"] < shared["pooled"]


def test_cli_family_option_per_key(tmp_path, capsys):
    path = tmp_path / "mixed.csv"
    _mixed_table(num_days=60).to_csv(path, index=False)
    args = ["fit", str(path), "--unit", "day", "--key", "var", "--value", "x", "--order", "t"]
    small = ["--epochs", "1", "--dim", "8", "--no-progress"]
    for option, expected in (
        (None, True),
        ("gaussian.per_key=false", False),
        ("gaussian.per_key=auto", True),
    ):
        out = tmp_path / f"fit_{expected}_{option is None}"
        extra = [] if option is None else ["--family-option", option]
        assert main([*args, *extra, "--out", str(out), *small]) == 0
        config = json.loads((out / "config.json").read_text())["model"]
        assert config["family_options"]["gaussian"]["per_key"] is expected, option
    assert (
        main([*args, "--family-option", "gaussian.per_key=maybe", "--out", str(tmp_path / "bad"), *small])
        == 2
    )
    assert "per_key must be True, False or 'auto'" in capsys.readouterr().err
