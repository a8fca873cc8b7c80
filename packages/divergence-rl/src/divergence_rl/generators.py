"""Generator functions f(u) of the DPH-RL rehearsal term, u = pi_theta / pi_ref per token.

``D_f(pi_theta || pi_ref) = E_{a ~ pi_ref}[f(u)]``: on responses sampled from the initial policy the
per-token mean of ``f(exp(log pi_theta - log pi_ref))`` estimates the divergence. Every form is
computed in float64 from the log-ratio ``r = log u`` with ``expm1`` / ``log1p`` in forms without
first-order cancellation (``js`` is rewritten so its two terms are both O(r^2); ``forward_kl`` and
``alpha`` use their Taylor series in r for |r| < 0.05), so values and gradients near u = 1 keep their
relative precision, then cast back. ``forward_kl``, ``js`` and ``alpha`` are clamped at 0 from below
(their exact value is >= 0; the clamp only removes rounding). ``r`` is clamped to
``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]`` (the reference code's +-20) before use, so u stays in
[2e-9, 4.9e8] and every value is finite in float32; outside the bounds the value is constant and its
gradient is zero.
"""

from __future__ import annotations

import math

import torch

from klcore.errors import ConfigError, DTypeError, NonFiniteError

#: |log u| is clamped to this before f is evaluated (the reference code's bound).
LOG_RATIO_BOUND = 20.0

#: below this |r|, forward_kl and alpha use their Taylor series in r up to r^SERIES_ORDER (truncation < 1e-18 relative)
SERIES_BOUND = 0.05
SERIES_ORDER = 10

#: kind -> the f(u) it computes (shown in error messages and the docs).
KINDS: dict[str, str] = {
    "forward_kl": "u - 1 - log u  (E_ref = KL(pi_ref || pi_theta), low-variance k3 form)",
    "forward_kl_plain": "-log u  (E_ref = KL(pi_ref || pi_theta), the paper's form)",
    "js": "1/2 [u log u - (u + 1) log((u + 1) / 2)]  (E_ref = JS(pi_theta, pi_ref), paper scale)",
    "alpha": "(u^(1-alpha) - (1-alpha) u - alpha) / (alpha (alpha - 1)),  alpha in (0, 1)",
    "reverse_kl": "u log u  (E_ref = KL(pi_theta || pi_ref); the baseline)",
}


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if it lies strictly inside (0, 1), else raise ``ConfigError``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(
            f"alpha must be a number strictly between 0 and 1, got {alpha!r}; alpha -> 1 is forward_kl and "
            "alpha -> 0 is reverse KL (u log u - u + 1): use those kinds for the limits"
        )
    return float(alpha)


def check_kind(kind: str) -> str:
    """Return ``kind`` if it names a generator in ``KINDS``, else raise ``ConfigError``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown divergence kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def f_values(
    log_ratio: torch.Tensor, kind: str, *, alpha: float = 0.2, bound: float = LOG_RATIO_BOUND
) -> torch.Tensor:
    """Per-token f(u) with u = exp(log_ratio) = pi_theta / pi_ref; same shape as ``log_ratio``.

    ``kind`` is one of ``KINDS``; ``alpha`` is used by ``alpha`` only. The result is float32
    (float64 when ``log_ratio`` is float64, for limit checks). ``forward_kl``, ``js`` and ``alpha``
    have f(1) = f'(1) = 0 and f >= 0; ``forward_kl_plain`` (f'(1) = -1) and ``reverse_kl``
    (f'(1) = 1) have f(1) = 0 and can be negative per token while their expectation under pi_ref
    is a divergence.
    """
    check_kind(kind)
    if not isinstance(log_ratio, torch.Tensor) or not log_ratio.is_floating_point():
        raise DTypeError(f"log_ratio must be a floating-point tensor, got {type(log_ratio).__name__} "
                         f"{getattr(log_ratio, 'dtype', '')}; pass log pi_theta - log pi_ref as float")
    if kind == "alpha":
        alpha = check_alpha(alpha)
    if not bound > 0:
        raise ConfigError(f"bound must be > 0, got {bound}")
    dtype = torch.float64 if log_ratio.dtype == torch.float64 else torch.float32
    if torch.isnan(log_ratio.detach()).any():
        raise NonFiniteError("log_ratio contains NaN; check the policy's and the stored log-probs")
    r = log_ratio.to(torch.float64).clamp(-bound, bound)
    return _generator(r, kind, alpha).to(dtype)


def _near_zero(r: torch.Tensor, direct: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    """``direct`` where ``|r| >= SERIES_BOUND``, else the series ``sum_n coeffs[n - 2] r^n`` (n = 2, 3, ...),
    which has no cancellation: the direct forms lose relative precision (value and gradient) as r -> 0."""
    series = torch.zeros_like(r)
    for c in reversed(coeffs):  # Horner
        series = series * r + c
    return torch.where(r.abs() < SERIES_BOUND, series * r * r, direct)


def _generator(r: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f(exp(r)) for a clamped float64 log-ratio ``r``."""
    if kind == "forward_kl_plain":
        return -r
    if kind == "reverse_kl":
        return torch.exp(r) * r
    orders = range(2, SERIES_ORDER + 1)
    if kind == "forward_kl":
        # e^r - 1 - r = sum_{n >= 2} r^n / n!
        f = _near_zero(r, torch.expm1(r) - r, [1.0 / math.factorial(n) for n in orders])
    elif kind == "js":
        # (u + 1) / 2 = e^(r/2) cosh(r/2), so 2 f = r (u - 1) / 2 - (u + 1) log cosh(r/2), both terms O(r^2);
        # log cosh(x) = log1p(2 sinh(x/2)^2) keeps its precision at small x.
        log_cosh = torch.log1p(2.0 * torch.sinh(0.25 * r) ** 2)
        f = 0.25 * r * torch.expm1(r) - 0.5 * (torch.exp(r) + 1.0) * log_cosh
    else:
        # u^(1-a) - (1-a) u - a = expm1((1-a) r) - (1-a) expm1(r) = sum_{n >= 2} ((1-a)^n - (1-a)) r^n / n!
        b, scale = 1.0 - alpha, alpha * (alpha - 1.0)
        direct = (torch.expm1(b * r) - b * torch.expm1(r)) / scale
        f = _near_zero(r, direct, [(b**n - b) / (math.factorial(n) * scale) for n in orders])
    return f.clamp_min(0.0)  # exact value >= 0: removes rounding below zero only


__all__ = ["KINDS", "LOG_RATIO_BOUND", "check_alpha", "check_kind", "f_values"]
