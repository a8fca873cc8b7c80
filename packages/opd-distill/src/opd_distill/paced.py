"""PACED problem weighting: pass rates from K student rollouts, w(p) = p^alpha (1 - p)^beta.

A problem's pass rate p is the fraction of K sampled student answers the verifier accepts. Its
distillation loss is weighted by the Beta kernel (peak at p* = alpha / (alpha + beta), zero at p = 0
and p = 1 for alpha, beta > 0), by the hard filter (1 when 0 < p < 1, else 0), or not at all.
``normalize=True`` rescales a batch's weights to mean one (so a loss aggregated over sequences is
sum w l / sum w, the convention of the authors' companion code); ``False`` uses the raw weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klcore.errors import ConfigError, DataError, ShapeError

WEIGHTINGS = ("none", "paced", "hard_filter")


def _exponent(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r} (PACED's default is 1.0)")
    return float(value)


def _numbers(values: object, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name} must be numbers (a tensor, float or list of floats), got {values!r:.80}: {exc}") from exc


def _pass_rates(p: torch.Tensor | float) -> torch.Tensor:
    t = _numbers(p, "pass rates")
    if not bool(torch.isfinite(t).all()) or bool(((t < 0) | (t > 1)).any()):
        raise DataError(f"pass rates must be finite and in [0, 1], got {p!r}; p = correct / K")
    return t


def paced_weight(p: torch.Tensor | float, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """w(p) = p^alpha (1 - p)^beta elementwise (float32, same shape as ``p``; 0^0 = 1)."""
    a, b = _exponent(alpha, "alpha"), _exponent(beta, "beta")
    t = _pass_rates(p)
    return t.pow(a) * (1.0 - t).pow(b)


def hard_filter_weight(p: torch.Tensor | float) -> torch.Tensor:
    """1 where 0 < p < 1 (the problem is neither never nor always solved), else 0; float32."""
    t = _pass_rates(p)
    return ((t > 0) & (t < 1)).float()


def normalize_weights(w: torch.Tensor) -> torch.Tensor:
    """``w / mean(w)`` (mean one over the batch); all zeros stay zeros (the batch carries no signal)."""
    total = w.float().sum()
    if float(total) == 0.0:
        return torch.zeros_like(w, dtype=torch.float32)
    return w.float() * (w.numel() / total)


def estimate_pass_rates(correct: torch.Tensor) -> torch.Tensor:
    """``[P, K]`` verifier outcomes (0/1) of K rollouts per problem -> ``[P]`` pass rates correct / K."""
    c = _numbers(correct, "correct (verifier outcomes)")
    if c.dim() != 2 or c.shape[1] < 1:
        raise ShapeError(f"correct must be [problems, K] with K >= 1 rollouts, got shape {tuple(c.shape)}")
    if not bool(((c == 0) | (c == 1)).all()):
        raise DataError("correct must hold verifier outcomes 0 or 1")
    return c.mean(1)


@dataclass
class PacedConfig:
    """How problems are weighted. ``weighting``: ``none``, ``paced`` (Beta kernel) or ``hard_filter``.

    ``samples`` = K rollouts per problem for the pass rate, re-estimated every ``every`` steps
    (0: once, before the first step). ``normalize``: weights rescaled to mean one per batch.
    """

    weighting: str = "none"
    alpha: float = 1.0
    beta: float = 1.0
    normalize: bool = True
    samples: int = 8
    every: int = 0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        _exponent(self.alpha, "alpha")
        _exponent(self.beta, "beta")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"samples (K rollouts per pass rate) must be an int >= 1, got {self.samples!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ConfigError(f"every must be an int >= 0 (0: estimate once), got {self.every!r}")

    def due(self, step: int) -> bool:
        """Whether the pass rates are (re-)estimated before step ``step``."""
        return self.weighting != "none" and (step == 0 or (self.every > 0 and step % self.every == 0))

    def weights(self, p: torch.Tensor) -> torch.Tensor:
        """Per-problem weights of a batch with pass rates ``p`` ``[B]`` (ones when unweighted)."""
        if self.weighting == "none":
            return torch.ones_like(_pass_rates(p))
        w = paced_weight(p, self.alpha, self.beta) if self.weighting == "paced" else hard_filter_weight(p)
        return normalize_weights(w) if self.normalize else w


__all__ = [
    "WEIGHTINGS",
    "PacedConfig",
    "estimate_pass_rates",
    "hard_filter_weight",
    "normalize_weights",
    "paced_weight",
]
