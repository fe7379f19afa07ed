"""Tests for :mod:`pyro_efa.embeddings`: alignment recovers known maps exactly; stability scores."""

import numpy as np
import pytest
import torch

from pyro_efa.embeddings import align_embeddings, stability


def _invertible(rng: np.random.Generator, d: int) -> np.ndarray:
    # a random invertible map with a moderate condition number
    U, _ = np.linalg.qr(rng.normal(size=(d, d)))
    V, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return U @ np.diag(np.linspace(0.5, 3.0, d)) @ V


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.normal(size=(d, d)))
    return Q * np.sign(np.diag(R))


def test_lstsq_recovers_invertible_map() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(size=(50, 4))
    A = _invertible(rng, 4)
    target = source @ A
    aligned, M = align_embeddings(source, target, method="lstsq")
    np.testing.assert_allclose(M, A, atol=1e-6)
    np.testing.assert_allclose(aligned, target, atol=1e-6)
    # and back: the inverse map
    _, M_inv = align_embeddings(target, source)
    np.testing.assert_allclose(M_inv, np.linalg.inv(A), atol=1e-6)


def test_lstsq_different_widths() -> None:
    rng = np.random.default_rng(1)
    source = rng.normal(size=(30, 3))
    A = rng.normal(size=(3, 5))
    aligned, M = align_embeddings(source, source @ A)
    assert M.shape == (3, 5)
    np.testing.assert_allclose(aligned, source @ A, atol=1e-6)


def test_procrustes_recovers_rotation_and_scale() -> None:
    rng = np.random.default_rng(2)
    source = rng.normal(size=(40, 3))
    Q = _rotation(rng, 3)
    aligned, M = align_embeddings(source, source @ Q, method="procrustes")
    np.testing.assert_allclose(M, Q, atol=1e-6)
    np.testing.assert_allclose(aligned, source @ Q, atol=1e-6)
    # with a global scale
    aligned, M = align_embeddings(source, 2.5 * source @ Q, method="procrustes", scale=True)
    np.testing.assert_allclose(M, 2.5 * Q, atol=1e-6)
    # without scale the map stays orthogonal
    _, M = align_embeddings(source, 2.5 * source @ Q, method="procrustes")
    np.testing.assert_allclose(M.T @ M, np.eye(3), atol=1e-6)


def test_procrustes_does_not_fit_a_general_map() -> None:
    rng = np.random.default_rng(3)
    source = rng.normal(size=(40, 3))
    target = source @ _invertible(rng, 3)
    aligned_p, Q = align_embeddings(source, target, method="procrustes")
    aligned_l, _ = align_embeddings(source, target, method="lstsq")
    np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-6)
    assert np.abs(aligned_p - target).max() > 0.1
    assert np.abs(aligned_l - target).max() < 1e-6


def test_torch_in_torch_out() -> None:
    rng = np.random.default_rng(4)
    A = _invertible(rng, 4)
    source = torch.randn(60, 4)
    target = source @ torch.as_tensor(A, dtype=torch.float32)
    aligned, M = align_embeddings(source, target)
    assert isinstance(aligned, torch.Tensor) and isinstance(M, torch.Tensor)
    assert aligned.dtype == torch.float32 and aligned.shape == (60, 4)
    torch.testing.assert_close(M, torch.as_tensor(A, dtype=torch.float32), atol=1e-4, rtol=1e-4)


def test_stability_scores() -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(200, 4))
    assert stability(emb, emb @ _invertible(rng, 4)) == pytest.approx(1.0, abs=1e-9)
    rotated = 3.0 * emb @ _rotation(rng, 4)
    assert stability(emb, rotated, method="procrustes", scale=True) == pytest.approx(1.0, abs=1e-9)
    assert stability(emb, rotated, method="procrustes") == pytest.approx(1.0, abs=1e-9)
    noisy = emb @ _invertible(rng, 4) + 0.5 * rng.normal(size=emb.shape)
    unrelated = rng.normal(size=emb.shape)
    s_noisy, s_unrelated = stability(emb, noisy), stability(emb, unrelated)
    assert s_unrelated < 0.3 < s_noisy < 0.99


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "cca"}, "method"),
        ({"method": "lstsq", "scale": True}, "procrustes"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    x = np.ones((5, 2))
    with pytest.raises(ValueError, match=match):
        align_embeddings(x, x, **kwargs)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same rows"):
        align_embeddings(np.ones((5, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        align_embeddings(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        align_embeddings(np.full((3, 2), np.nan), np.ones((3, 2)))


def test_stability_refuses_lstsq_with_too_few_rows() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="procrustes"):
        stability(rng.normal(size=(5, 8)), rng.normal(size=(5, 8)))
