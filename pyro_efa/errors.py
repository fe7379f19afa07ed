"""The library's exception for input it refuses."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Input that pyro_efa refuses: data (the message names the column, unit, key and value),
    options (the option, or the command-line flag under ``pyro-efa``), files (the file and why).

    It is raised by the library's own checks, before any training starts; it derives from
    :class:`ValueError`, so ``except ValueError`` catches it too.
    """
