"""The entropy-performance law R = -a exp(H) + b (Cui et al. 2025, Sec. 2), fitted by least squares.

``H`` is the policy entropy and ``R`` the performance (validation accuracy or reward) at the same
step. The law is linear in ``x = exp(H)``: ``R = b - a x``, so the fit is ordinary least squares.
The predicted ceiling is ``R(H = 0) = b - a`` and ``dR/dH = -a exp(H)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from klcore.errors import ConfigError, DataError, ShapeError

MIN_POINTS = 3
#: Below this R² a fit is reported as "no law" (no ceiling).
MIN_R2 = 0.5


@dataclass(frozen=True)
class EntropyLawFit:
    """Coefficients of R = -a exp(H) + b; ``r2`` and ``rmse`` on the ``n`` points fitted."""

    a: float
    b: float
    r2: float
    rmse: float
    n: int

    @property
    def ceiling(self) -> float:
        """Predicted performance when the entropy is exhausted, R(H = 0) = b - a."""
        return self.b - self.a

    def holds(self, min_r2: float = MIN_R2) -> bool:
        """Whether the data follow the law: ``a > 0`` (performance falls as entropy grows) and ``r2 >= min_r2``."""
        return self.a > 0 and self.r2 >= min_r2

    def predict(self, entropy: Sequence[float] | np.ndarray) -> np.ndarray:
        """R at each entropy value (nats)."""
        return self.b - self.a * np.exp(np.asarray(entropy, dtype=np.float64))


@dataclass(frozen=True)
class EntropyLawExtrapolation:
    """Fit on the first ``n_fit`` points of a run, predict the remaining ones.

    ``rmse`` and ``max_error`` are over the predicted points; ``final_error`` is prediction minus
    truth at the last point.
    """

    fit: EntropyLawFit
    n_fit: int
    n_predicted: int
    rmse: float
    max_error: float
    final_error: float


def _floats(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be a sequence of numbers (one per step), got {values!r:.80}: {exc}") from exc
    if array.ndim != 1:
        raise ShapeError(
            f"{name} must be 1-D (one value per step), got shape {array.shape}; "
            "for several runs pass one series per run to the joint fit, or flatten deliberately"
        )
    return array


def _series(entropy: Sequence[float] | np.ndarray, performance: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, r = _floats(entropy, "entropy"), _floats(performance, "performance")
    if h.shape != r.shape:
        raise DataError(f"entropy has {h.size} points but performance has {r.size}; pass one value of each per step")
    if h.size < MIN_POINTS:
        raise DataError(f"need at least {MIN_POINTS} (entropy, performance) points to fit the law, got {h.size}")
    for name, v in (("entropy", h), ("performance", r)):
        if not np.all(np.isfinite(v)):
            raise DataError(f"{name} holds NaN or inf at index {int(np.argmin(np.isfinite(v)))}; drop or fix those steps")
    if np.any(h < 0):
        raise DataError(
            f"entropy must be >= 0 nats (a Shannon entropy), got {h.min():.4g} at index {int(np.argmin(h))}; "
            "check the sign (pass H, not -H or a mean log-prob)"
        )
    if np.any(h > 50):
        raise DataError(f"entropy must be in nats (exp(H) overflows past ~700); got a maximum of {h.max():.3g}")
    if np.ptp(h) == 0:
        raise DataError("every entropy value is the same; the law needs entropy that varies over the run")
    return h, r


def fit_entropy_law(entropy: Sequence[float] | np.ndarray, performance: Sequence[float] | np.ndarray) -> EntropyLawFit:
    """Least-squares fit of ``performance = -a exp(entropy) + b``; entropy in nats, one point per step."""
    h, r = _series(entropy, performance)
    x = np.exp(h)
    design = np.stack([-x, np.ones_like(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - (b - a * x)
    total = float(np.sum((r - r.mean()) ** 2))
    sse = float(np.sum(residual**2))
    r2 = 1.0 - sse / total if total > 0 else (1.0 if sse == 0 else 0.0)
    return EntropyLawFit(a=float(a), b=float(b), r2=r2, rmse=math.sqrt(sse / h.size), n=int(h.size))


def fit_entropy_law_joint(
    runs: Sequence[tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
) -> EntropyLawFit:
    """One (a, b) for several runs of one model and task (as the paper fits across algorithms):
    least squares over every run's (entropy, performance) points; ``runs`` holds one pair of 1-D series per run."""
    if isinstance(runs, (str, bytes)) or not isinstance(runs, Sequence) or not runs:
        raise DataError("runs must be a non-empty sequence of (entropy, performance) pairs, one per run")
    hs, rs = [], []
    for i, run in enumerate(runs):
        if not isinstance(run, (tuple, list)) or len(run) != 2:
            raise DataError(f"run {i} must be an (entropy, performance) pair, got {type(run).__name__}")
        h, r = _floats(run[0], f"entropy of run {i}"), _floats(run[1], f"performance of run {i}")
        if h.shape != r.shape:
            raise DataError(f"run {i} has {h.size} entropy values but {r.size} performance values")
        hs.append(h)
        rs.append(r)
    return fit_entropy_law(np.concatenate(hs), np.concatenate(rs))


def extrapolate_entropy_law(
    entropy: Sequence[float] | np.ndarray, performance: Sequence[float] | np.ndarray, *, fit_fraction: float = 0.15
) -> EntropyLawExtrapolation:
    """Fit the law on the first ``fit_fraction`` of the run (at least 3 points) and predict the rest.

    The paper fits the first ~15% of steps (36 of ~240) and reports the RMSE on the rest.
    """
    if isinstance(fit_fraction, bool) or not isinstance(fit_fraction, (int, float)) or not 0 < fit_fraction < 1:
        raise ConfigError(f"fit_fraction must be in (0, 1), got {fit_fraction!r}")
    h, r = _series(entropy, performance)
    n_fit = max(MIN_POINTS, math.ceil(fit_fraction * h.size))
    if n_fit >= h.size:
        raise DataError(
            f"fitting on {n_fit} of {h.size} points leaves none to predict; pass a longer run or a smaller fit_fraction"
        )
    fit = fit_entropy_law(h[:n_fit], r[:n_fit])
    error = fit.predict(h[n_fit:]) - r[n_fit:]
    return EntropyLawExtrapolation(
        fit=fit, n_fit=n_fit, n_predicted=int(error.size), rmse=float(np.sqrt(np.mean(error**2))),
        max_error=float(np.max(np.abs(error))), final_error=float(error[-1]),
    )


__all__ = [
    "MIN_R2", "EntropyLawExtrapolation", "EntropyLawFit", "extrapolate_entropy_law", "fit_entropy_law",
    "fit_entropy_law_joint",
]
