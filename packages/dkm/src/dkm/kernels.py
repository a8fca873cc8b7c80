"""Kernels as functions of Gram matrices, acting on GramBlocks (the full test block is never formed).

Each kernel maps G to K(G) block by block and adds the relative jitter of ``dkm.jitter`` to the
diagonals: K_aa <- K_aa (1 + eps) + eps. Hyperparameters are learned through their logs.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from dkm.gram import GramBlocks
from dkm.linalg import get_jitter
from klcore.errors import ConfigError, NotPSDError, ShapeError


def arccos_kernel(gram: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
    """Order-1 arccos (ReLU) kernel: (sqrt(g_a g_b)/pi) (sin t + (pi - t) cos t), cos t = G_ab / sqrt(g_a g_b).

    ``gram`` is ``[..., A, B]`` or ``[..., B]`` (a test block with leading batch/spatial dims), ``diag_a`` its
    leading shape without the last dim, ``diag_b`` ``[B]``. Equals 2 E[relu(u) relu(v)] for (u, v)
    Gaussian with covariance [[g_a, G_ab], [G_ab, g_b]], so K_aa = g_a (He scaling).
    """
    if diag_a.shape != gram.shape[:-1] or diag_b.shape != gram.shape[-1:]:
        raise ShapeError(
            f"arccos_kernel: gram {tuple(gram.shape)} needs diag_a of shape {tuple(gram.shape[:-1])} and diag_b of "
            f"shape {tuple(gram.shape[-1:])}, got {tuple(diag_a.shape)} and {tuple(diag_b.shape)}"
        )
    norm = torch.sqrt((diag_a[..., None] * diag_b).clamp_min(torch.finfo(gram.dtype).tiny))
    margin = 1e-12 if gram.dtype == torch.float64 else 1e-6  # keeps arccos' derivative finite at cos = +-1
    cos = (gram / norm).clamp(-1.0 + margin, 1.0 - margin)
    theta = torch.arccos(cos)
    return norm / math.pi * (torch.sin(theta) + (math.pi - theta) * cos)


def squared_distance(gram: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
    """d^2_ab = g_a + g_b - 2 G_ab, clamped at 0 (round-off)."""
    return (diag_a[..., None] + diag_b - 2.0 * gram).clamp_min(0.0)


def _log_param(value: float, name: str, dtype: torch.dtype) -> nn.Parameter:
    if not value > 0.0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return nn.Parameter(torch.tensor(math.log(value), dtype=dtype))


def _check_diagonal(diag: torch.Tensor, what: str, kernel: str) -> None:
    """A Gram matrix G = F F^T / N has g_aa = |f_a|^2 / N >= 0; refuse negative entries (beyond round-off)."""
    low = float(diag.detach().min()) if diag.numel() else 0.0
    if low < -1e-10 * (1.0 + float(diag.detach().abs().max())):
        raise NotPSDError(
            f"{kernel}: {what} has a negative diagonal entry ({low:.3g}); a Gram matrix has g_aa >= 0. "
            "Build it as F F^T / N (dkm.input_gram) or check the layer that produced it"
        )


class GramKernel(nn.Module, abc.ABC):
    """Base class: ``forward(G: GramBlocks) -> K: GramBlocks`` with jitter on the diagonals."""

    @abc.abstractmethod
    def cross(self, gram: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
        """K for an ``[A, B]`` block from its Gram block and the two diagonals."""

    @abc.abstractmethod
    def diagonal(self, diag: torch.Tensor) -> torch.Tensor:
        """K_aa from g_a."""

    def forward(self, gram: GramBlocks) -> GramBlocks:
        eps = get_jitter()
        g_i = gram.ii.diagonal()
        _check_diagonal(g_i, "the inducing block G_ii", type(self).__name__)
        if gram.t is not None:
            _check_diagonal(gram.t, "the test diagonal g_t", type(self).__name__)
        k_ii = self.cross(gram.ii, g_i, g_i)
        k_ii = k_ii - torch.diag_embed(k_ii.diagonal()) + torch.diag_embed(self.diagonal(g_i) * (1 + eps) + eps)
        if gram.ti is None or gram.t is None:
            return GramBlocks(k_ii)
        return GramBlocks(k_ii, self.cross(gram.ti, gram.t, g_i), self.diagonal(gram.t) * (1 + eps) + eps)


class ReluKernel(GramKernel):
    """sigma_w^2 arccos_1(G) + sigma_b^2 (infinite ReLU layer, He scaling); defaults 1 and 0.1 as in the paper code."""

    def __init__(self, sigma_w2: float = 1.0, sigma_b2: float = 0.1, *, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.log_sigma_w2 = _log_param(sigma_w2, "sigma_w2", dtype)
        self.log_sigma_b2 = _log_param(sigma_b2, "sigma_b2", dtype)

    def cross(self, gram: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
        return self.log_sigma_w2.exp() * arccos_kernel(gram, diag_a, diag_b) + self.log_sigma_b2.exp()

    def diagonal(self, diag: torch.Tensor) -> torch.Tensor:
        return self.log_sigma_w2.exp() * diag + self.log_sigma_b2.exp()


class SqExpKernel(GramKernel):
    """outputscale * exp(-(g_a + g_b - 2 G_ab) / (2 lengthscale^2)); defaults 1 and 1 as in the paper code."""

    def __init__(
        self, lengthscale: float = 1.0, outputscale: float = 1.0, *, dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        self.log_lengthscale = _log_param(lengthscale, "lengthscale", dtype)
        self.log_outputscale = _log_param(outputscale, "outputscale", dtype)

    def cross(self, gram: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
        d2 = squared_distance(gram, diag_a, diag_b)
        return self.log_outputscale.exp() * torch.exp(-0.5 * d2 * torch.exp(-2.0 * self.log_lengthscale))

    def diagonal(self, diag: torch.Tensor) -> torch.Tensor:
        return self.log_outputscale.exp().expand_as(diag)


class NormalizedGaussianKernel(GramKernel):
    """sigma_w^2 sqrt(g_a g_b) exp(G_ab / sqrt(g_a g_b) - 1) + sigma_b^2 (the SKR paper's kernel)."""

    def __init__(self, sigma_w2: float = 1.0, sigma_b2: float = 0.1, *, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.log_sigma_w2 = _log_param(sigma_w2, "sigma_w2", dtype)
        self.log_sigma_b2 = _log_param(sigma_b2, "sigma_b2", dtype)

    def cross(self, gram: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
        norm = torch.sqrt((diag_a[..., None] * diag_b).clamp_min(torch.finfo(gram.dtype).tiny))
        return self.log_sigma_w2.exp() * norm * torch.exp(gram / norm - 1.0) + self.log_sigma_b2.exp()

    def diagonal(self, diag: torch.Tensor) -> torch.Tensor:
        return self.log_sigma_w2.exp() * diag + self.log_sigma_b2.exp()


class LinearKernel(GramKernel):
    """sigma_w^2 G + sigma_b^2 (a deep linear network; the case with closed-form optima)."""

    def __init__(self, sigma_w2: float = 1.0, sigma_b2: float = 0.0, *, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.log_sigma_w2 = _log_param(sigma_w2, "sigma_w2", dtype)
        self.sigma_b2 = float(sigma_b2)
        if self.sigma_b2 < 0:
            raise ConfigError(f"sigma_b2 must be >= 0, got {sigma_b2!r}")

    def cross(self, gram: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
        return self.log_sigma_w2.exp() * gram + self.sigma_b2

    def diagonal(self, diag: torch.Tensor) -> torch.Tensor:
        return self.log_sigma_w2.exp() * diag + self.sigma_b2


KERNELS: dict[str, type[GramKernel]] = {
    "relu": ReluKernel,
    "sqexp": SqExpKernel,
    "normalized-gaussian": NormalizedGaussianKernel,
    "linear": LinearKernel,
}


def make_kernel(name: str, *, dtype: torch.dtype = torch.float64) -> GramKernel:
    """A kernel by name: relu, sqexp, normalized-gaussian or linear (default hyperparameters)."""
    if name not in KERNELS:
        raise ConfigError(f"unknown kernel {name!r}; choose one of {', '.join(KERNELS)}")
    return KERNELS[name](dtype=dtype)


__all__ = [
    "KERNELS",
    "GramKernel",
    "LinearKernel",
    "NormalizedGaussianKernel",
    "ReluKernel",
    "SqExpKernel",
    "arccos_kernel",
    "make_kernel",
    "squared_distance",
]
