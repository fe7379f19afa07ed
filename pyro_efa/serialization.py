"""Saving and loading fits: JSON configuration and tensors only, so loading never executes code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .data import EFAData, Vocabulary
from .infer import EFAFit, _atomic_write, _load_error, make_guide
from .model import EFA

__all__ = ["load", "save"]

FORMAT = "pyro_efa.fit/1"


def _dummy_batch(efa: EFA, schema: dict[str, Any]) -> EFAData:
    # one unit with one observation of key 0, used to create the guide's parameters on load
    family = efa.families[int(efa.key_family[0])]
    value = torch.full((1, 1), float(family.fill_value))
    return EFAData(
        kind=efa.kind,
        key_index=torch.zeros(1, 1, dtype=torch.long),
        values=value.to(torch.get_default_dtype()),
        mask=torch.ones(1, 1, dtype=torch.bool),
        target=torch.ones(1, 1, dtype=torch.bool),
        unit_index=torch.zeros(1, dtype=torch.long),
        num_units=1,
        keys=schema["keys"],
        items=schema["items"],
        unit_labels=["<dummy>"],
        columns=schema["columns"],
    )


def save(fitted: EFAFit, path: str | os.PathLike) -> None:
    """Save a fit of an :class:`EFA` model to the directory ``path``.

    Writes ``config.json`` (model configuration, guide, vocabularies, history) and
    ``params.pt`` (tensors only; loaded with ``torch.load(weights_only=True)``). Each file is
    written to a temporary name and renamed, so an interrupted save leaves the old files intact.
    """
    if not isinstance(fitted.model, EFA):
        raise TypeError("save() handles fits of an EFA model; save a larger model's state_dict yourself")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    schema = fitted.schema
    config = {
        "format": FORMAT,
        "model": fitted.model.config,
        "guide": fitted.guide_type,
        "options": fitted.options,
        "data": {
            "kind": schema["kind"],
            "columns": schema["columns"],
            "keys": schema["keys"].to_dict(),
            "items": None if schema["items"] is None else schema["items"].to_dict(),
        },
        "history": {
            "losses": fitted.losses,
            "val_nll": fitted.val_nll,
            "best_epoch": fitted.best_epoch,
            "seconds": fitted.seconds,
        },
    }
    state = {"model": fitted.model.state_dict(), "guide": fitted.guide.state_dict()}
    _atomic_write(path / "params.pt", lambda tmp: torch.save(state, tmp))
    _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def load(path: str | os.PathLike) -> EFAFit:
    """Load a fit saved by :func:`save` (no code is executed: JSON and tensors only).

    :raises ValueError: if the directory does not hold a readable fit.
    """
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} does not hold a readable pyro_efa fit (config.json: {e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path}/config.json is not a {FORMAT} file")
    try:
        # tensors and plain containers only: a tampered file cannot make this run code
        state = torch.load(path / "params.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for damaged files
        raise ValueError(f"{path}/params.pt could not be read ({_load_error(e)})") from e
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in ("model", "guide")):
        raise ValueError(f"{path}/params.pt is not a pyro_efa parameter file (no model and guide states)")
    try:
        model = EFA(**config["model"])
        d = config["data"]
        schema = {
            "kind": d["kind"],
            "columns": d["columns"],
            "keys": Vocabulary.from_dict(d["keys"]),
            "items": None if d["items"] is None else Vocabulary.from_dict(d["items"]),
        }
        options = config.get("options", {})
        guide = make_guide(model, config["guide"], rank=options.get("rank", 8))
        with torch.no_grad():
            guide(_dummy_batch(model, schema))
        h = config["history"]
        history = dict(
            losses=list(h["losses"]),
            val_nll=list(h["val_nll"]),
            best_epoch=int(h["best_epoch"]),
            seconds=float(h["seconds"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(
            f"{path}/config.json is damaged or from another version ({type(e).__name__}: {e})"
        ) from e
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{path}/params.pt does not match its config.json ({e})") from e
    model.eval()
    return EFAFit(
        model=model,
        guide=guide,
        guide_type=config["guide"],
        schema=schema,
        options=options,
        **history,
    )
