"""Gaussian KL divergences between zero-mean (or mean mu) Gaussians given by covariance matrices."""

from __future__ import annotations

import torch

from dkm.linalg import safe_cholesky
from klcore.errors import DTypeError, ShapeError


def kl_from_cholesky(chol_g: torch.Tensor, chol_k: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu, G) || N(0, K)) summed over the columns of ``mean`` ``[P, C]`` (one column if None).

    ``chol_g``, ``chol_k``: lower Cholesky factors ``[P, P]`` of G and K. Closed form
    1/2 [C (tr(K^-1 G) - P + log|K| - log|G|) + sum_c mu_c^T K^-1 mu_c].
    """
    p = chol_g.shape[0]
    columns = 1 if mean is None else mean.shape[1]
    solved = torch.linalg.solve_triangular(chol_k, chol_g, upper=False)
    logdet_k = 2.0 * chol_k.diagonal().log().sum()
    logdet_g = 2.0 * chol_g.diagonal().log().sum()
    kl = 0.5 * columns * (solved.square().sum() - p + logdet_k - logdet_g)
    if mean is not None:
        kl = kl + 0.5 * torch.linalg.solve_triangular(chol_k, mean, upper=False).square().sum()
    return kl


def gaussian_kl(G: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """KL(N(0, G) || N(0, K)) for one feature column: 1/2 [tr(K^-1 G) - P + log|K| - log|G|].

    ``G``, ``K``: symmetric positive definite ``[P, P]``; returns a scalar in their dtype. Raises
    NotPSDError (after jitter retries) if either is not positive definite.
    """
    if not (isinstance(G, torch.Tensor) and isinstance(K, torch.Tensor)) or not (
        G.is_floating_point() and K.is_floating_point()
    ):
        raise DTypeError(
            f"G and K must be floating-point torch tensors (float64 recommended), got "
            f"{getattr(G, 'dtype', type(G).__name__)} and {getattr(K, 'dtype', type(K).__name__)}; convert with .double()"
        )
    if G.shape != K.shape:
        raise ShapeError(f"G and K must have the same [P, P] shape, got {tuple(G.shape)} and {tuple(K.shape)}")
    return kl_from_cholesky(safe_cholesky(G, name="G"), safe_cholesky(K, name="K"))


__all__ = ["gaussian_kl", "kl_from_cholesky"]
