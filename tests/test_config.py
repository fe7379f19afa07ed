"""EFAConfig and FitOptions: every field checked where the configuration is built, presets, the
round trip through JSON and the fit directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyro_efa import EFA, EFAConfig, EFAData, FitOptions, InputError, fit, load, save

SMALL = dict(dim=8, num_layers=1, num_heads=1, head_dim=8)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(direction="sideways"), "direction must be one of"),
        (dict(dim=0), "dim must be an integer >= 1"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_heads=2.5), "num_heads"),
        (dict(ff_dim=-1), "ff_dim"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_fraction=0.0), "target_fraction"),
        (dict(prior_scale=-1.0), "prior_scale"),
        (dict(pool="max"), "pool"),
        (dict(attention="linear"), "attention"),
        (dict(context_stream="both"), "context_stream"),
        (dict(value_embedding="table"), "value_embedding"),
        (dict(num_heads=2, project=False), "project=False needs num_heads=1"),
        (dict(direction="bi", num_layers=2, encoding="one_pass"), "exact only"),
        (dict(family="lognormal"), "unknown family 'lognormal'"),
        (dict(family_options={"binomial": {"trials": 3}}), r"unknown option\(s\) \['trials'\].*total_count"),
        (dict(kind="valued", num_keys=2, exclude_context_items=True), "item sequences only"),
        (dict(kind="valued", num_keys=2, family=("poisson",)), "1 entries for 2 keys"),
        (dict(kind="valued", num_keys=2, key_embedding="mlp"), "key_features"),
        (dict(kind="valued", num_keys=2, value_embedding="lookup"), "num_value_levels"),
        (dict(kind="items", num_keys=1), "num_items"),
        (dict(kind="tensor", num_keys=1), "kind must be one of"),
    ],
)
def test_every_field_is_checked_when_the_config_is_built(fields: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        EFAConfig(**fields)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(lr_decay=1.0), "lr_decay"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(lr_patience=-1), "lr_patience"),
        (dict(threads=0), "threads"),
        (dict(checkpoint_every=-2), "checkpoint_every"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_every_fit_option_is_checked(fields: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        FitOptions(**fields)


def test_replace_and_unknown_fields() -> None:
    c = EFAConfig(dim=16)
    assert c.replace(num_layers=3).num_layers == 3 and c.num_layers == 2  # frozen: a copy
    with pytest.raises(InputError, match=r"unknown EFA option\(s\) \['layers'\].*num_layers"):
        c.replace(layers=3)
    with pytest.raises(InputError, match="unknown fit option"):
        FitOptions().replace(epochs=3)
    with pytest.raises(AttributeError):
        c.dim = 3  # type: ignore[misc]


def test_a_partial_config_needs_the_data(counts: EFAData) -> None:
    config = EFAConfig(family="poisson", **SMALL)
    assert not config.is_complete
    with pytest.raises(InputError, match="EFA.from_data"):
        EFA(config)
    with pytest.raises(TypeError, match="EFAConfig"):
        EFA(family="poisson")  # type: ignore[call-arg]
    model = EFA.from_data(counts, config, direction="bi")
    c = model.config
    assert c.is_complete and c.direction == "bi" and c.family == ("poisson",) * len(counts.keys)
    assert c.num_keys == len(counts.keys) and c.key_embedding == "lookup"
    assert len(c.value_center) == len(counts.keys) and c.max_len == max(512, 2 * counts.max_len)


def test_config_round_trips_through_json_and_rebuilds_the_model(counts: EFAData) -> None:
    model = EFA.from_data(counts, family="poisson", layer_norm=True, ff_dim=4, **SMALL)
    text = json.dumps(model.config.to_dict())
    again = EFAConfig.from_dict(json.loads(text))
    assert again == model.config
    rebuilt = EFA(again)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_efe_preset(counts: EFAData) -> None:
    efe = EFAConfig.efe()
    assert (efe.attention, efe.num_layers, efe.num_heads, efe.position, efe.residual) == (
        "uniform", 1, 1, False, False,
    )  # fmt: skip
    assert efe.value_embedding == "key_linear" and efe.pool == "mean" and not efe.standardize
    assert EFAConfig.efe("items").pool == "sum"
    model = EFA.efe(counts, family="poisson", dim=4)
    assert model.config.attention == "uniform" and model.config.dim == 4
    with pytest.raises(InputError, match="unknown EFA option"):
        EFAConfig.efe(depth=2)


def test_families_declare_what_the_model_reads(counts: EFAData) -> None:
    """The number of classes comes from the categorical family's declaration, not its name."""
    data = counts
    model = EFA.from_data(data, family="categorical", **SMALL)
    top = int(data.values[data.target & data.mask].max())
    assert model.config.family_options["categorical"]["num_categories"] == top + 1
    given = EFA.from_data(data, family="categorical", family_options={"categorical": {"num_categories": 20}})
    assert given.config.family_options["categorical"]["num_categories"] == 20


def test_the_fit_directory_holds_the_config(counts: EFAData, tmp_path: Path) -> None:
    model = EFA.from_data(counts, family="poisson", **SMALL)
    f = fit(model, counts, num_epochs=1, lr=0.01, progress=False)
    save(f, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert EFAConfig.from_dict(saved["model"]) == model.config
    assert FitOptions.from_dict(saved["options"]) == f.options and f.options.lr == 0.01
    g = load(tmp_path)
    assert g.efa.config == model.config and g.options == f.options
    for k, v in model.state_dict().items():
        assert torch.equal(v, g.model.state_dict()[k])
