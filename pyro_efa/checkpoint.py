"""Training checkpoints of :func:`pyro_efa.fit`: what they hold, writing, reading and checking them.

A checkpoint (``checkpoint.pt``, written atomically by rank 0) holds the model, guide and
optimizer states, every random state (torch, Python, NumPy, CUDA; one set per process), the batch
order of the current epoch and the step within it, the history, the early-stopping state, the
options that shape the fit's trajectory, and the data vocabularies and model configuration as
JSON. It is read with ``torch.load(weights_only=True)``: no code is ever executed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .files import load_error_reason

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "check_resumable",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
]

#: the format tag a checkpoint file carries
CHECKPOINT_FORMAT = "pyro_efa.checkpoint/1"
#: the file name of a checkpoint inside ``checkpoint_dir``
CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every random state that training may draw from, as tensors, numbers and lists only
    (loadable with ``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`pyro_efa.fit` (a directory or the file itself).

    Only tensors, numbers, strings, lists and dicts are read (``torch.load(weights_only=True)``);
    no code is executed, whatever the file holds.

    :raises ValueError: for a missing, truncated, tampered or foreign file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, pickle opcodes that are not allowed, ...
        raise InputError(
            f"{path} could not be read as a pyro_efa checkpoint ({load_error_reason(e)}); delete it to "
            "start over"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    needed = {
        "step": int, "epoch": int, "step_in_epoch": int, "epoch_generator": torch.Tensor,
        "state": dict, "optimizer": dict, "rng": list, "total": float, "losses": list,
        "val_nll": list, "best": dict, "options": dict, "config": str,
    }  # fmt: skip
    for key, kind in needed.items():
        if not isinstance(ckpt.get(key), kind):
            raise InputError(f"{path} is damaged: entry {key!r} is missing or not a {kind.__name__}")
    try:
        ckpt["config"] = json.loads(ckpt["config"])
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is damaged: its configuration is not valid JSON ({e})") from e
    return ckpt


def check_resumable(
    ckpt: dict[str, Any], trajectory: dict[str, Any], config: dict[str, Any], path: Path
) -> None:
    """Refuse to resume from ``ckpt`` when the options that shape the trajectory, or the data
    vocabularies and columns, differ from this fit's."""
    saved = json.loads(json.dumps(ckpt["options"]))
    now = json.loads(json.dumps(trajectory))
    changed = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise InputError(
            f"cannot resume from {path}: it was written with other options ({'; '.join(changed)}); "
            "resume with the same options and data, or delete the checkpoint to start over"
        )
    if ckpt["config"].get("data") != json.loads(json.dumps(config["data"])):
        raise InputError(
            f"cannot resume from {path}: its data vocabularies or columns differ from this data's"
        )
