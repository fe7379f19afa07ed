"""Saving and loading fits: JSON configuration and tensors only, so loading never executes code.

A fit directory holds ``config.json`` (the model's :class:`~pyro_efa.EFAConfig`, the guide's
name and options, the :class:`~pyro_efa.FitOptions`, the data vocabularies and the history) and
``params.pt`` (the model's and the guide's tensors). Fits of an :class:`~pyro_efa.EFA` model with
a guide built by name (:data:`pyro_efa.guides.GUIDES`) can be saved: loading rebuilds the model
from its configuration and the guide from its name and options.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import EFAConfig, FitOptions
from .data import EFAData, schema_from_json, schema_to_json
from .errors import InputError
from .files import atomic_write, load_error_reason
from .guides import GUIDES, make_guide, recipe
from .model import EFA
from .results import EFAFit

__all__ = ["load", "save"]

FORMAT = "pyro_efa.fit/2"
OLD_FORMATS = ("pyro_efa.fit/1",)


def _dummy_batch(efa: EFA, schema: dict[str, Any]) -> EFAData:
    # one unit with one observation of key 0, used to create the guide's parameters on load
    family = efa.families[int(efa.key_family[0])]
    ones = torch.ones(1, 1, dtype=torch.bool)
    return EFAData(
        kind=efa.kind,
        key_index=torch.zeros(1, 1, dtype=torch.long),
        values=torch.full((1, 1), float(family.fill_value), dtype=torch.get_default_dtype()),
        mask=ones,
        target=ones.clone(),
        unit_index=torch.zeros(1, dtype=torch.long),
        num_units=1,
        keys=schema["keys"],
        items=schema["items"],
        unit_labels=["<dummy>"],
        columns=schema["columns"],
    )


def save(fitted: EFAFit, path: str | os.PathLike) -> None:
    """Save a fit of an :class:`~pyro_efa.EFA` model to the directory ``path``.

    Writes ``config.json`` and ``params.pt`` (tensors only; loaded with
    ``torch.load(weights_only=True)``). Each file is written to a temporary name and renamed, so
    an interrupted save leaves the old files intact.

    :raises TypeError: for a fit of a larger model, or with a guide object that was not built by
        name (the file could not rebuild it); the message says which guides can be saved.
    """
    if not isinstance(fitted.model, EFA):
        raise TypeError("save() handles fits of an EFA model; save a larger model's state_dict yourself")
    guide = recipe(fitted.guide)
    if guide is None:
        raise TypeError(
            f"save() can store fits whose guide was given by name ({', '.join(GUIDES)}; see "
            f"pyro_efa.guides.make_guide), which load() rebuilds; this fit's guide is a "
            f"{type(fitted.guide).__name__} object. Keep its state_dict() with torch.save and rebuild it "
            "yourself"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "model": fitted.model.config.to_dict(),
        "guide": guide,
        "options": fitted.options.to_dict(),
        "data": schema_to_json(fitted.schema),
        "history": {
            "losses": fitted.losses,
            "val_nll": fitted.val_nll,
            "best_epoch": fitted.best_epoch,
            "seconds": fitted.seconds,
        },
    }
    state = {"model": fitted.model.state_dict(), "guide": fitted.guide.state_dict()}
    atomic_write(path / "params.pt", lambda tmp: torch.save(state, tmp))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def _upgrade(config: dict[str, Any]) -> dict[str, Any]:
    """A ``pyro_efa.fit/1`` configuration in the current format (nothing a user saved is lost)."""
    model = dict(config["model"])
    num_keys = int(model["num_keys"])
    for name in ("value_center", "value_scale"):
        if not isinstance(model.get(name), list):
            model[name] = [float(model.get(name, 0.0 if name == "value_center" else 1.0))] * num_keys
    options = dict(config.get("options", {}))
    guide = {"name": config["guide"], **({"rank": options["rank"]} if config["guide"] == "lowrank" else {})}
    known = set(FitOptions.__dataclass_fields__)
    return {
        **config,
        "model": model,
        "guide": guide,
        "options": {k: v for k, v in options.items() if k in known},
    }


def load(path: str | os.PathLike) -> EFAFit:
    """Load a fit saved by :func:`save` (no code is executed: JSON and tensors only).

    :raises ValueError: if the directory does not hold a readable fit.
    """
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} does not hold a readable pyro_efa fit (config.json: {e})") from e
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, *OLD_FORMATS):
        raise InputError(f"{path}/config.json is not a {FORMAT} file")
    try:
        # tensors and plain containers only: a tampered file cannot make this run code
        state = torch.load(path / "params.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for damaged files
        raise InputError(f"{path}/params.pt could not be read ({load_error_reason(e)})") from e
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in ("model", "guide")):
        raise InputError(f"{path}/params.pt is not a pyro_efa parameter file (no model and guide states)")
    try:
        if config["format"] in OLD_FORMATS:
            config = _upgrade(config)
        model = EFA(EFAConfig.from_dict(config["model"]))
        schema = schema_from_json(config["data"])
        guide = make_guide(model, **config["guide"])
        with torch.no_grad():
            guide(_dummy_batch(model, schema))
        h = config["history"]
        history = dict(
            losses=list(h["losses"]),
            val_nll=list(h["val_nll"]),
            best_epoch=int(h["best_epoch"]),
            seconds=float(h["seconds"]),
        )
        options = FitOptions.from_dict(config.get("options", {}))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise InputError(
            f"{path}/config.json is damaged or from another version ({type(e).__name__}: {e})"
        ) from e
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
    except (KeyError, RuntimeError) as e:
        raise InputError(f"{path}/params.pt does not match its config.json ({e})") from e
    model.eval()
    return EFAFit(
        model=model,
        guide=guide,
        guide_name=str(config["guide"]["name"]),
        schema=schema,
        options=options,
        **history,
    )
