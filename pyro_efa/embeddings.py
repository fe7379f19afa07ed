r"""Aligning embeddings from different fits.

EFA embeddings are identifiable only up to an invertible linear map: replacing the context
embeddings ``alpha`` by ``alpha @ A`` and compensating in the layers that read them leaves every
natural parameter unchanged. Two fits (other seeds, other data) therefore give embedding tables
that agree only after one is mapped onto the other. :func:`align_embeddings` estimates that map
and :func:`stability` scores the agreement.

Both work on 2-D tables ``(rows, latent)``: NumPy arrays or torch tensors (the result has the
type of ``source``).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

__all__ = ["align_embeddings", "stability"]

ArrayLike = np.ndarray | torch.Tensor

METHODS = ("lstsq", "procrustes")


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise InputError(f"{name} must be a 2-D (rows, latent) table, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{name} has NaN or infinite entries")
    return a


def _like(a: np.ndarray, ref: ArrayLike) -> ArrayLike:
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(
            a, dtype=ref.dtype if ref.is_floating_point() else torch.float64, device=ref.device
        )
    return a


def align_embeddings(
    source: ArrayLike,
    target: ArrayLike,
    method: str = "lstsq",
    *,
    scale: bool = False,
) -> tuple[ArrayLike, ArrayLike]:
    r"""Map ``source`` onto ``target``, row by row.

    ``method="lstsq"``: the linear map

    .. math:: A = \arg\min_A \lVert \mathrm{source}\, A - \mathrm{target} \rVert_F,

    the least-squares solution (minimum norm when ``source`` has rank below its width). It is
    invertible when both tables have full column rank and are related by an invertible map, the
    case the identifiability result covers; it recovers such a map exactly. It needs more rows
    than latent dims to be informative (with ``rows <= latent`` any target is matched exactly).

    ``method="procrustes"``: the orthogonal map (a rotation or reflection, optionally times a
    scale ``c``)

    .. math::

        Q = U V^\top, \quad \mathrm{source}^\top \mathrm{target} = U \Sigma V^\top, \qquad
        c = \frac{\operatorname{tr} \Sigma}{\lVert \mathrm{source} \rVert_F^2},

    which minimises :math:`\lVert c\, \mathrm{source}\, Q - \mathrm{target} \rVert_F` over
    orthogonal ``Q`` (and ``c > 0`` with ``scale=True``). It preserves distances and angles
    between rows, so it is the stricter comparison.

    :param source: ``(rows, d_s)`` embeddings to map.
    :param target: ``(rows, d_t)`` embeddings to map onto (the same rows, in the same order).
    :param str method: ``"lstsq"`` or ``"procrustes"``.
    :param bool scale: also fit a global scale ``c`` (Procrustes only).
    :returns: ``(aligned, A)``: ``aligned = source @ A`` and the ``(d_s, d_t)`` map ``A``
        (``c Q`` for Procrustes), of the type of ``source``.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if scale and method != "procrustes":
        raise InputError("scale=True applies to method='procrustes' only (lstsq maps already scale)")
    src, tgt = _as_numpy(source, "source"), _as_numpy(target, "target")
    if src.shape[0] != tgt.shape[0]:
        raise InputError(f"source and target need the same rows, got {src.shape[0]} and {tgt.shape[0]}")
    if method == "lstsq":
        A, *_ = np.linalg.lstsq(src, tgt, rcond=None)
    else:
        U, sigma, Vt = np.linalg.svd(src.T @ tgt, full_matrices=False)
        Q = U @ Vt
        c = sigma.sum() / max(float((src**2).sum()), np.finfo(np.float64).tiny) if scale else 1.0
        A = c * Q
    return _like(src @ A, source), _like(A, source)


def stability(emb_a: ArrayLike, emb_b: ArrayLike, method: str = "lstsq", *, scale: bool = False) -> float:
    r"""Agreement of two fits' embeddings: the correlation of ``emb_a`` aligned onto ``emb_b``
    with ``emb_b``, over all entries.

    .. math::

        \mathrm{stability} = \operatorname{corr}\big(\operatorname{vec}(\mathrm{emb\_a}\, A),
        \operatorname{vec}(\mathrm{emb\_b})\big)

    with ``A`` from :func:`align_embeddings`. It is 1 when the fits differ only by a map of the
    chosen kind and near 0 for unrelated embeddings with many more rows than latent dims (with
    ``method="lstsq"`` and few rows per latent dim even noise scores high: use Procrustes or
    more rows). It is not symmetric in ``emb_a`` and ``emb_b``.

    :returns: a float in ``[-1, 1]``.
    """
    rows, dims = _as_numpy(emb_a, "emb_a").shape
    if method == "lstsq" and rows <= dims:
        raise InputError(
            f"least-squares alignment of {rows} rows in {dims} latent dims fits any target exactly: "
            "the score would be 1 for noise; use method='procrustes' or more rows than dims"
        )
    aligned, _ = align_embeddings(emb_a, emb_b, method=method, scale=scale)
    x = _as_numpy(aligned, "aligned").ravel()
    y = _as_numpy(emb_b, "emb_b").ravel()
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x**2).sum() * (y**2).sum()))
    if denom == 0.0:
        raise InputError("constant embeddings have no correlation")
    return float((x * y).sum() / denom)
