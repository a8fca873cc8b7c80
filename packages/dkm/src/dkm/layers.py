"""Learned Gram layers (Cholesky parameterisation, NNGP initialisation, sparse conditional) and the output layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from dkm.gram import GramBlocks
from dkm.kl import kl_from_cholesky
from dkm.linalg import safe_cholesky
from klcore.errors import ConfigError, NotPSDError, ShapeError


def _cholesky_parameter(chol: torch.Tensor) -> torch.Tensor:
    """V with (tril(V, -1) + diag(exp(diag V))) / sqrt(P) = chol, so V is O(1) for Adam."""
    scaled = chol * math.sqrt(chol.shape[0])
    return scaled.tril(-1) + torch.diag_embed(scaled.diagonal().log())


def _cholesky_factor(v: torch.Tensor) -> torch.Tensor:
    return (v.tril(-1) + torch.diag_embed(v.diagonal().exp())) / math.sqrt(v.shape[0])


def conditional_solves(chol_k: torch.Tensor, k_ti: torch.Tensor, chol_g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """X = L^-1 K_it ``[P_i, P_t]`` and W = X^T L^-1 L_G ``[P_t, P_i]`` from one triangular solve."""
    both = torch.linalg.solve_triangular(chol_k, torch.cat([k_ti.T, chol_g], dim=1), upper=False)
    x = both[:, : k_ti.shape[0]]
    return x, x.T @ both[:, k_ti.shape[0] :]


class GramLayer(nn.Module):
    """One DKM layer: a learned inducing Gram G_ii = L_G L_G^T with nu * KL(N(0, G_ii) || N(0, K_ii)).

    ``forward(K) -> (G, penalty)``. The test blocks follow the prior conditional:
    G_ti = K_ti K_ii^-1 G_ii, g_t = diag(K_ti K_ii^-1 G_ii K_ii^-1 K_it) + k_t - diag(K_ti K_ii^-1 K_it).
    ``nu = inf`` is the NNGP (G = K, no parameters, no penalty). Call ``initialise(K_ii)`` before
    training: it sets G_ii = K_ii, so the KL starts at zero. ``whiten=True`` learns G_ii relative to the
    prior, L_G = L_K L_A (L_K = chol K_ii, L_A from V as above, A = I at the start), so that KL = KL(N(0, A) ||
    N(0, I)) and G_ii follows K_ii when the layers below (or the input scales) change: the same objective,
    better conditioned, and the layers below get a first-order gradient through the likelihood.
    """

    def __init__(
        self,
        num_inducing: int,
        nu: float,
        *,
        name: str = "layer",
        whiten: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if num_inducing < 1:
            raise ConfigError(f"num_inducing must be >= 1, got {num_inducing}")
        if not nu >= 0.0:
            raise ConfigError(f"nu must be >= 0 (inf for the NNGP), got {nu!r}")
        self.nu = float(nu)
        self.name = name
        self.whiten = whiten
        self.v = None if math.isinf(self.nu) else nn.Parameter(torch.eye(num_inducing, dtype=dtype))

    def chol_gram(self, chol_k: torch.Tensor | None = None) -> torch.Tensor:
        """Lower Cholesky factor of the learned G_ii (only when nu is finite); a whitened layer needs chol K_ii."""
        if self.v is None:
            raise ConfigError(f"{self.name} has nu = inf (NNGP): it has no learned Gram matrix")
        if not self.whiten:
            return _cholesky_factor(self.v)
        if chol_k is None:
            raise ConfigError(f"{self.name} is whitened: pass the Cholesky factor of K_ii to chol_gram")
        return chol_k @ _cholesky_factor(self.v)

    @torch.no_grad()
    def initialise(self, k_ii: torch.Tensor) -> None:
        """Set G_ii = K_ii (the NNGP forward pass), so this layer's KL is zero."""
        if self.v is None:
            return
        if k_ii.shape != self.v.shape:
            raise ShapeError(f"{self.name}: K_ii has shape {tuple(k_ii.shape)}, the layer holds {tuple(self.v.shape)}")
        target = torch.eye(k_ii.shape[0], dtype=k_ii.dtype, device=k_ii.device) if self.whiten else k_ii
        self.v.copy_(_cholesky_parameter(safe_cholesky(target, name=f"K_ii of {self.name}")))

    def forward(self, k: GramBlocks) -> tuple[GramBlocks, torch.Tensor]:
        if self.v is None:
            return k, k.ii.new_zeros(())
        chol_k = safe_cholesky(k.ii, name=f"K_ii of {self.name}")
        chol_g = self.chol_gram(chol_k)
        if self.nu == 0:
            penalty = k.ii.new_zeros(())
        elif self.whiten:  # KL(N(0, L_K A L_K^T) || N(0, L_K L_K^T)) = KL(N(0, A) || N(0, I))
            chol_a = _cholesky_factor(self.v)
            penalty = self.nu * kl_from_cholesky(
                chol_a, torch.eye(chol_a.shape[0], dtype=chol_a.dtype, device=chol_a.device)
            )
        else:
            penalty = self.nu * kl_from_cholesky(chol_g, chol_k)
        g_ii = chol_g @ chol_g.T
        if k.ti is None or k.t is None:
            return GramBlocks(g_ii), penalty
        lead = k.t.shape  # [P_t] or, for convolutional layers, [B, H, W]
        x, w = conditional_solves(chol_k, k.ti.reshape(-1, chol_k.shape[0]), chol_g)
        g_t = (w.square().sum(1) - x.square().sum(0)).reshape(lead) + k.t
        tolerance = 1e-6 * (1.0 + k.t.detach().abs())
        if (g_t.detach() < -tolerance).any():
            raise NotPSDError(
                f"{self.name}: the conditional test variance went negative (min {float(g_t.min()):.3g}); "
                "K_ii is ill-conditioned: raise the jitter (dkm.jitter), use float64 or lower the learning rate"
            )
        return GramBlocks(g_ii, (w @ chol_g.T).reshape(*lead, -1), g_t.clamp_min(0.0)), penalty


class OutputLayer(nn.Module):
    """Variational top layer q(f_lambda at inducing points) = N(mu_lambda, A), A shared by the C outputs.

    ``forward(K) -> (mean [P_t, C], var [P_t], kl)`` with mean = K_ti K_ii^-1 mu,
    var = k_t - diag(K_ti K_ii^-1 K_it) + diag(K_ti K_ii^-1 A K_ii^-1 K_it), kl = sum_c KL(N(mu_c, A) || N(0, K_ii)).
    """

    def __init__(self, num_inducing: int, num_outputs: int, *, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ConfigError(f"num_outputs must be >= 1, got {num_outputs}")
        self.mu = nn.Parameter(torch.zeros(num_inducing, num_outputs, dtype=dtype))
        self.v = nn.Parameter(torch.eye(num_inducing, dtype=dtype))

    def chol_cov(self) -> torch.Tensor:
        """Lower Cholesky factor of A."""
        return _cholesky_factor(self.v)

    @torch.no_grad()
    def initialise(self, k_ii: torch.Tensor) -> None:
        """q = prior: mu = 0, A = K_ii (KL zero)."""
        self.mu.zero_()
        self.v.copy_(_cholesky_parameter(safe_cholesky(k_ii, name="K_ii of the output layer")))

    @torch.no_grad()
    def set_optimal_gaussian(self, k_ii: torch.Tensor, y: torch.Tensor, noise: float) -> None:
        """The exact posterior when the inducing points are the training points and the likelihood is
        Gaussian with variance ``noise``: A = (K^-1 + I/noise)^-1, mu = A y / noise."""
        eye = torch.eye(k_ii.shape[0], dtype=k_ii.dtype, device=k_ii.device)
        a = k_ii - k_ii @ torch.linalg.solve(k_ii + noise * eye, k_ii)
        self.mu.copy_(a @ y / noise)
        self.v.copy_(_cholesky_parameter(safe_cholesky(0.5 * (a + a.T), name="A")))

    def forward(self, k: GramBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if k.ti is None or k.t is None:
            raise ShapeError("the output layer needs test blocks (K_ti and k_t); pass test inputs to the model")
        chol_k = safe_cholesky(k.ii, name="K_ii of the output layer")
        chol_a = self.chol_cov()
        x, w = conditional_solves(chol_k, k.ti, chol_a)
        alpha = torch.cholesky_solve(self.mu, chol_k)
        mean = k.ti @ alpha
        var = (k.t - x.square().sum(0) + w.square().sum(1)).clamp_min(0.0)
        return mean, var, kl_from_cholesky(chol_a, chol_k, self.mu)


__all__ = ["GramLayer", "OutputLayer", "conditional_solves"]
