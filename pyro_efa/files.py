"""Writing and reading files safely: atomic replacement, and readable reasons for refused files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write", "load_error_reason", "write_torch"]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s directory, then rename it over
    ``path``: a reader (or a crash) sees the old file or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through :func:`atomic_write`, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def load_error_reason(e: Exception) -> str:
    """A one-line reason why ``torch.load(weights_only=True)`` refused a file."""
    text = str(e)
    for line in text.splitlines():
        low = line.lower()
        if "unsupported global" in low or "unsupported operand" in low:
            reason = line.split("error:", 1)[-1].strip().split(" was not an allowed global")[0]
            reason = reason.split(" whose module")[0]
            return (
                f"it holds pickled Python objects, not only tensors ({reason}); they are never "
                "loaded, since loading them could run code"
            )
    if text.startswith("Weights only load failed"):
        return "it holds pickled Python objects that are never loaded, since loading them could run code"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"the file is truncated, damaged or not a torch file: {type(e).__name__}: {first[:200]}"
