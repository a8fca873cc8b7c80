"""The paper's diagnostics (Cui et al. 2025): Eq. 5 entropy, Table 1 top-covariance means, the share of
positive covariance the top tokens carry, and how the covariance tracks the entropy change over a run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from entropy_rl._inputs import check_tokens
from klcore.errors import ConfigError, DataError

#: Table 1's token shares: top 0.02%, 0.2% and 2% of tokens by covariance.
TABLE1_FRACTIONS: tuple[float, ...] = (2e-4, 2e-3, 2e-2)


def sequence_mean_entropy(token_entropy: torch.Tensor, mask: torch.Tensor) -> float:
    """Eq. 5: token entropy ``[B, T]`` (nats) averaged within each response, then over responses with a
    valid token."""
    valid = check_tokens({"token_entropy": token_entropy}, mask, allow_empty=False)
    m = valid.float()
    lengths = m.sum(-1)
    per_response = (token_entropy.detach().float() * m).sum(-1) / lengths.clamp(min=1)
    return float(per_response[lengths > 0].mean())


def _top_values(cov: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    if not 0 < fraction < 1:
        raise ConfigError(f"token fractions must be in (0, 1), got {fraction!r}")
    values = cov.detach().float()[valid]
    if values.numel() == 0:
        raise DataError("the mask selects no token")
    count = max(1, int(fraction * values.numel()))
    return torch.topk(values, count).values


def top_covariance_means(
    cov: torch.Tensor, mask: torch.Tensor, fractions: Sequence[float] = TABLE1_FRACTIONS
) -> dict[float, float]:
    """Table 1: mean token covariance ``[B, T]`` of the top ``max(1, int(f N))`` valid tokens, per fraction."""
    valid = check_tokens({"cov": cov}, mask, allow_empty=False)
    return {float(f): float(_top_values(cov, valid, f).mean()) for f in fractions}


def top_positive_share(cov: torch.Tensor, mask: torch.Tensor, ratio: float) -> float:
    """``cov/top_frac``: share of the summed positive token covariance carried by the top
    ``max(1, int(ratio N))`` tokens (0 when no token has positive covariance)."""
    valid = check_tokens({"cov": cov}, mask, allow_empty=False)
    total = float(cov.detach().float()[valid].clamp(min=0).sum())
    if total == 0:
        return 0.0
    return float(_top_values(cov, valid, ratio).clamp(min=0).sum()) / total


def covariance_entropy_agreement(
    covariance: Sequence[float] | np.ndarray, entropy_change: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """Over a run's steps: Pearson ``corr(cov, -dH)`` and the share of steps with ``cov > 0`` (Sec. 3.3).

    ``corr`` is NaN with fewer than 3 steps or a constant series.
    """
    c = np.asarray(covariance, dtype=np.float64)
    d = np.asarray(entropy_change, dtype=np.float64)
    if c.ndim != 1 or c.shape != d.shape or c.size == 0:
        raise DataError(f"pass two 1-D series of the same length, got shapes {c.shape} and {d.shape}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(d))):
        raise DataError("covariance and entropy_change must be finite; drop the steps without them")
    positive = float(np.mean(c > 0))
    if c.size < 3 or np.ptp(c) == 0 or np.ptp(d) == 0:
        return float("nan"), positive
    return float(np.corrcoef(c, -d)[0, 1]), positive


__all__ = [
    "TABLE1_FRACTIONS",
    "covariance_entropy_agreement",
    "sequence_mean_entropy",
    "top_covariance_means",
    "top_positive_share",
]
