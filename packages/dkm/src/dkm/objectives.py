"""DKM objectives as modules returning ``(loss, metrics)``, loss = -objective per data point."""

from __future__ import annotations

import torch
from torch import nn

from dkm._marginal import gaussian_log_marginal
from dkm.conv import ConvDKM
from dkm.likelihoods import GaussianLikelihood, Likelihood
from dkm.models import FullDKM, SparseDKM
from klcore.errors import ConfigError, DataError, ShapeError


class FullDKMObjective(nn.Module):
    """L = sum_lambda log N(y_lambda; 0, K(G_L) + noise I) - sum_l nu_l KL(N(0, G_l) || N(0, K(G_{l-1}))).

    ``forward(x, y) -> (loss, metrics)`` with loss = -L / P; ``x`` must be the model's training inputs.
    With no hidden layer L is the exact GP log marginal likelihood.
    """

    def __init__(self, model: FullDKM, likelihood: GaussianLikelihood) -> None:
        super().__init__()
        if not isinstance(likelihood, GaussianLikelihood):
            raise ConfigError("the full DKM has a closed form only for GaussianLikelihood; use SparseDKM otherwise")
        self.model = model
        self.likelihood = likelihood

    def log_objective(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, log-likelihood, penalty) for targets ``y [P]`` or ``[P, D]`` (totals, not per point)."""
        k, penalty = self.model()
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[0] != k.ii.shape[0]:
            raise ShapeError(f"y must be [{k.ii.shape[0]}] or [{k.ii.shape[0]}, D], got shape {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise DataError("targets hold NaN or infinite values; drop or impute them first")
        eye = torch.eye(y.shape[0], dtype=k.ii.dtype, device=k.ii.device)
        loglik = gaussian_log_marginal(k.ii + self.likelihood.noise * eye, y.to(k.ii.dtype), name="K(G_L) + noise I")
        return loglik - penalty, loglik, penalty

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if x.shape != self.model.train_x.shape or not torch.equal(x.to(self.model.train_x.dtype), self.model.train_x):
            raise DataError("the full DKM is tied to its training inputs: pass the same x the model was built with")
        objective, loglik, penalty = self.log_objective(y)
        p = x.shape[0]
        metrics = {"dkm/objective": objective.item() / p, "dkm/loglik": loglik.item() / p, "dkm/kl": penalty.item() / p}
        return -objective / p, metrics

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor, y: torch.Tensor, *, train_y: torch.Tensor) -> float:
        """Mean negative log predictive density of held-out ``x [P_v, N0]``, ``y [P_v]`` or ``[P_v, D]``
        (summed over outputs) given the training targets ``train_y``: the early-stopping criterion."""
        y = y[:, None] if y.ndim == 1 else y
        mean, var = self.model.predict(x, train_y, self.likelihood.noise)
        if y.shape != mean.shape:
            raise ShapeError(f"validation y must be [{mean.shape[0]}] or {list(mean.shape)}, got {tuple(y.shape)}")
        return -self.likelihood.log_predictive(y.to(mean.dtype), mean, var).mean().item()


class SparseDKMObjective(nn.Module):
    """mean_j E_q log p(y_j | f_j) - (sum_l nu_l KL_l + sum_c KL(q(f_c) || p(f_c))) / num_data.

    ``forward(x, y) -> (loss, metrics)`` on a minibatch; loss = -objective (per data point), an
    unbiased estimate of the full-data objective / num_data. ``model``: a SparseDKM or a ConvDKM.
    """

    def __init__(self, model: SparseDKM | ConvDKM, likelihood: Likelihood, num_data: int) -> None:
        super().__init__()
        if num_data < 1:
            raise ConfigError(f"num_data must be >= 1, got {num_data}")
        self.model = model
        self.likelihood = likelihood
        self.num_data = num_data

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        y = self.likelihood.check_targets(y, self.model.num_outputs)
        if y.shape[0] != x.shape[0]:
            raise ShapeError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        out = self.model(x)
        ell = self.likelihood.expected_log_prob(y, out.mean, out.var).mean()
        kl = out.kl / self.num_data
        objective = ell - kl
        metrics = {"dkm/objective": objective.item(), "dkm/ell": ell.item(), "dkm/kl": kl.item()}
        return -objective, metrics

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor, y: torch.Tensor, *, train_y: torch.Tensor | None = None) -> float:
        """Mean negative log predictive density of held-out ``x``, ``y`` (``train_y`` is unused: the sparse
        model summarises the data in q(f)): the early-stopping criterion."""
        y = self.likelihood.check_targets(y, self.model.num_outputs)
        out = self.model(x)
        return -self.likelihood.log_predictive(y, out.mean, out.var).mean().item()


__all__ = ["FullDKMObjective", "SparseDKMObjective"]
