"""Generator functions f(u) of the DPH-RL rehearsal term, u = pi_theta / pi_ref per token.

``D_f(pi_theta || pi_ref) = E_{a ~ pi_ref}[f(u)]``: on responses sampled from the initial policy the
per-token mean of ``f(exp(log pi_theta - log pi_ref))`` estimates the divergence. Every form is
computed from the log-ratio ``r = log u`` with ``expm1`` / ``softplus`` so values near u = 1 keep
their precision. ``r`` is clamped to ``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]`` (the reference code's
+-20) before use, so u stays in [2e-9, 4.9e8] and every value is finite in float32; outside the
bounds the value is constant and its gradient is zero.
"""

from __future__ import annotations

import math

import torch

from klcore.errors import ConfigError, DTypeError, NonFiniteError

#: |log u| is clamped to this before f is evaluated (the reference code's bound).
LOG_RATIO_BOUND = 20.0

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
    r = log_ratio.to(dtype)
    if torch.isnan(r.detach()).any():
        raise NonFiniteError("log_ratio contains NaN; check the policy's and the stored log-probs")
    r = r.clamp(-bound, bound)
    if kind == "forward_kl":
        return torch.expm1(r) - r
    if kind == "forward_kl_plain":
        return -r
    if kind == "reverse_kl":
        return torch.exp(r) * r
    if kind == "js":
        # log((u + 1) / 2) = softplus(r) - log 2
        return 0.5 * (torch.exp(r) * r - (torch.exp(r) + 1.0) * (torch.nn.functional.softplus(r) - math.log(2.0)))
    # u^(1-a) - (1-a) u - a = expm1((1-a) r) - (1-a) expm1(r)
    return (torch.expm1((1.0 - alpha) * r) - (1.0 - alpha) * torch.expm1(r)) / (alpha * (alpha - 1.0))


__all__ = ["KINDS", "LOG_RATIO_BOUND", "check_alpha", "check_kind", "f_values"]
