"""Likelihoods: Gaussian (closed-form expected log-likelihood) and categorical (Monte Carlo)."""

from __future__ import annotations

import math

import torch
from torch import nn

from klcore.errors import ConfigError, DataError, DTypeError, ShapeError


class GaussianLikelihood(nn.Module):
    """y = f + N(0, noise) per output; ``noise`` is learned through its log (default 0.1)."""

    def __init__(self, noise: float = 0.1, *, learn_noise: bool = True, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if not noise > 0.0:
            raise ConfigError(f"noise must be > 0, got {noise!r}")
        log_noise = torch.tensor(math.log(noise), dtype=dtype)
        self.log_noise = nn.Parameter(log_noise, requires_grad=learn_noise)

    @property
    def noise(self) -> torch.Tensor:
        return self.log_noise.exp()

    def check_targets(self, y: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """y as ``[P, C]`` float (a ``[P]`` vector counts as one output)."""
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != num_outputs:
            raise ShapeError(f"targets must be [P] or [P, {num_outputs}], got shape {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise DataError("targets hold NaN or infinite values; drop or impute them first")
        return y.to(self.log_noise.dtype)

    def expected_log_prob(self, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """E_{f ~ N(mean, var)} log N(y; f, noise), summed over outputs: ``[P]`` (exact, no sampling)."""
        noise = self.noise
        per = -0.5 * (math.log(2 * math.pi) + self.log_noise + ((y - mean).square() + var[:, None]) / noise)
        return per.sum(-1)

    def log_predictive(self, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """log N(y; mean, var + noise) summed over outputs: ``[P]``."""
        total = var[:, None] + self.noise
        return (-0.5 * (math.log(2 * math.pi) + total.log() + (y - mean).square() / total)).sum(-1)


class CategoricalLikelihood(nn.Module):
    """Softmax over C latent functions; expected log-likelihood and predictions by Monte Carlo.

    ``num_samples`` draws per training step (fresh each step), ``predict_samples`` draws for
    predictions (fixed draws shared across points, so a point's prediction does not depend on its batch).
    """

    def __init__(self, num_samples: int = 16, predict_samples: int = 1000, *, seed: int = 0) -> None:
        super().__init__()
        if num_samples < 1 or predict_samples < 1:
            raise ConfigError(f"need num_samples >= 1 and predict_samples >= 1, got {num_samples}, {predict_samples}")
        self.num_samples = num_samples
        self.predict_samples = predict_samples
        self.seed = seed

    def check_targets(self, y: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """Class indices ``[P]`` (int64) in [0, C)."""
        if y.ndim != 1:
            raise ShapeError(f"class targets must be [P] integer indices, got shape {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex():
            raise DTypeError(f"class targets must be integer indices, got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_outputs):
            raise DataError(f"class targets must lie in [0, {num_outputs}), got range [{int(y.min())}, {int(y.max())}]")
        return y.long()

    def expected_log_prob(self, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Monte Carlo E_q log softmax(f)_y with reparameterised draws: ``[P]``."""
        eps = torch.randn(self.num_samples, *mean.shape, dtype=mean.dtype, device=mean.device)
        logits = mean + var.sqrt()[:, None] * eps
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, y[None, :, None].expand(self.num_samples, -1, 1)).squeeze(-1).mean(0)

    def predict_log_proba(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """log of the Monte Carlo average of softmax(f): ``[P, C]``."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        eps = torch.randn(self.predict_samples, 1, mean.shape[1], generator=gen, dtype=mean.dtype).to(mean.device)
        logits = mean + var.sqrt()[:, None] * eps
        return torch.logsumexp(torch.log_softmax(logits, -1), 0) - math.log(self.predict_samples)

    def log_predictive(self, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """log p(y | data) per point: ``[P]``."""
        return self.predict_log_proba(mean, var).gather(-1, y[:, None]).squeeze(-1)


Likelihood = GaussianLikelihood | CategoricalLikelihood

__all__ = ["CategoricalLikelihood", "GaussianLikelihood", "Likelihood"]
