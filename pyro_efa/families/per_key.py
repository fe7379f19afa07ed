"""Shared or per-key nuisance parameters: the ``per_key`` option of a family and its ``"auto"``
rule (:func:`resolve_per_key`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import InputError

__all__ = ["PER_KEY_MIN_COUNT", "per_key_flag", "resolve_per_key"]

_AUTO = "auto"  # the value of per_key resolved from the training data

#: training observations each key needs for ``per_key="auto"`` to give it its own nuisance
#: parameter (see :func:`resolve_per_key`)
PER_KEY_MIN_COUNT = 20


def _is_auto(per_key: Any) -> bool:
    return isinstance(per_key, str) and per_key == _AUTO


def per_key_flag(per_key: Any) -> bool:
    """``per_key`` as the flag a family is built with: ``True`` or ``False`` as given, and
    ``"auto"`` not resolved from data as ``False`` (shared: the default before ``"auto"``, so fits
    saved earlier reload unchanged).

    :raises InputError: for anything other than ``True``, ``False`` or ``"auto"``.
    """
    if _is_auto(per_key):
        return False
    if isinstance(per_key, str) or per_key not in (True, False):
        raise InputError(f"per_key must be True, False or 'auto', got {per_key!r}")
    return bool(per_key)


def resolve_per_key(family: type, given: Any, counts: torch.Tensor) -> bool | None:
    """The ``per_key`` option to store for ``family`` when its effective value is ``"auto"``.

    A family with a nuisance parameter (the Gaussian scale, the negative-binomial dispersion, the
    Gamma shape, the Tweedie dispersion) holds it shared by its keys (``per_key=False``) or one
    per key (``per_key=True``). Their default, ``"auto"``, is resolved by
    :meth:`EFA.from_data <pyro_efa.EFA.from_data>` from the training data: **one per key when
    every key the family serves has at least** :data:`PER_KEY_MIN_COUNT` **(20) training
    observations, shared otherwise**; keys without training observations are not counted (their
    parameter keeps its initial value). The resolved ``True`` / ``False`` is what the model's
    configuration stores, so a saved fit reloads with the same parameters.

    Why a threshold: keys of mixed-type data live on different scales (temperatures in F, wind
    in m/s), and one shared scale makes the NLL of a low-variance key worse than that of its own
    mean; but a per-key scale fitted by MAP to a key with one or two observations collapses
    toward 0 (a movie with a single rating) and its held-out NLL diverges. With 20 observations
    the relative standard error of a scale estimate is about ``1 / sqrt(2 * 20) = 16%``.

    :param family: a :class:`~pyro_efa.Family` subclass.
    :param given: the ``per_key`` option the user gave, or ``None`` for the family's default
        (the default of its ``per_key`` argument).
    :param ~torch.Tensor counts: training observations of each key the family serves (1-D).
    :returns: ``True`` when every key with observations has at least :data:`PER_KEY_MIN_COUNT`
        of them, ``False`` otherwise (or when no key has any); ``None`` when the effective value
        is not ``"auto"`` (``True`` / ``False`` given, or a family whose default is ``False``):
        nothing to store.
    """
    if given is None:
        parameter = inspect.signature(family.__init__).parameters.get("per_key")
        given = None if parameter is None else parameter.default
    if not _is_auto(given):
        return None
    seen = counts[counts > 0]
    return bool(seen.numel() > 0 and bool((seen >= PER_KEY_MIN_COUNT).all()))
