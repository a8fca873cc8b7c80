"""Divergences between categorical distributions given as logits, and sample-based KL estimators.

Full-distribution functions take two ``[..., V]`` logit tensors (any float dtype, same shape) and
return one float32 value per position, shape ``[...]``, in nats. They run over chunks of rows and
upcast one chunk at a time, so no float32 ``[..., V]`` copy is ever materialised. The KL family
(``kl``, ``forward_kl``, ``reverse_kl``, ``js``, ``generalized_jsd``) has closed-form gradients computed
a chunk at a time in backward, so it stores nothing ``[..., V]`` for backward (``checkpoint`` changes
nothing there); for ``alpha_divergence`` and ``f_divergence`` pass ``checkpoint=True`` to recompute
each chunk in backward instead of storing its intermediates.
An optional boolean ``mask`` of shape ``[...]`` zeroes (and skips validation of) unmasked positions.

Argument order follows the names: ``kl(p, q)`` is KL(P || Q). The distillation helpers take
``(student, teacher)`` like TRL's GKD: ``forward_kl`` is KL(T || S), ``reverse_kl`` is KL(S || T).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from klcore import _checks
from klcore._chunks import map_rows, rows_per_chunk
from klcore.errors import ConfigError, ShapeError, VocabMismatchError

Generator = Callable[[torch.Tensor], torch.Tensor]


def _pair(p_logits: torch.Tensor, q_logits: torch.Tensor, names: tuple[str, str]) -> None:
    _checks.floating(p_logits, names[0])
    _checks.floating(q_logits, names[1])
    _checks.min_dims(p_logits, names[0], 1, "[..., V]")
    if p_logits.shape[-1] != q_logits.shape[-1]:
        raise VocabMismatchError(
            f"{names[0]} has vocabulary size {p_logits.shape[-1]} but {names[1]} has {q_logits.shape[-1]}; "
            "both distributions must be over the same vocabulary (same tokenizer / output head)"
        )
    if p_logits.shape != q_logits.shape:
        raise ShapeError(
            f"{names[0]} has shape {tuple(p_logits.shape)} but {names[1]} has shape {tuple(q_logits.shape)}"
        )


def _per_position(
    row_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    names: tuple[str, str],
    chunk_size: int | None,
    checkpoint: bool,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    _pair(p_logits, q_logits, names)
    lead = p_logits.shape[:-1]
    vocab = p_logits.shape[-1]

    (out,) = map_rows(
        row_fn,
        (p_logits.reshape(-1, vocab), q_logits.reshape(-1, vocab)),
        chunk_size=chunk_size,
        checkpoint=checkpoint,
        vocab=vocab,
    )
    out = out.reshape(lead)
    if mask is not None:
        m = _checks.mask(mask, "mask", lead, allow_empty=True)
        out = torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))
    _checks.finite(out.detach(), f"divergence of ({names[0]}, {names[1]}) (NaN/inf logits or an overflowing generator)")
    return out


def _lsm(x: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of a chunk of rows (the upcast happens inside the kernel)."""
    return F.log_softmax(x, dim=-1, dtype=torch.float32)


def _log_mixture(la: torch.Tensor, lb: torch.Tensor, log_wa: float, log_wb: float) -> torch.Tensor:
    """log(w_a A + w_b B) from log-probs. Where both are 0 (-inf) the value is a finite placeholder: every
    use of it is multiplied by a zero probability, and a finite value keeps NaN out of the gradient."""
    dead = torch.isneginf(la) & torch.isneginf(lb)
    la = torch.where(dead, 0.0, la)
    lb = torch.where(dead, 0.0, lb)
    return torch.logaddexp(la + log_wa, lb + log_wb)


class _ChunkedPair(torch.autograd.Function):
    """KL(P || Q) (``beta`` None) or the generalised JSD(beta) of (S = P, T = Q), per row of ``[N, V]``
    logits, forward and backward a chunk of rows at a time in float32 with closed-form gradients.

    Nothing ``[N, V]`` is stored for backward but the inputs (the caller holds them anyway) and two
    ``[N]`` log-normalisers; backward recomputes each chunk's log-probs from them and writes the input
    gradients in the inputs' dtype. With lp, lq the log-probs and v the row's value:

    * KL: dv/dz_p = P (lp - lq - v), dv/dz_q = Q - P;
    * JSD(beta), M = beta T + (1 - beta) S: dv/dz_s = (1 - beta) S (a - sum S a) with a = ls - lm, and
      dv/dz_t = beta T (c - sum T c) with c = lt - lm (0 log 0 = 0 throughout).
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, q: torch.Tensor, beta: float | None, step: int) -> torch.Tensor:  # type: ignore[override]
        n = p.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=p.device)
        lse = torch.empty((2, n), dtype=torch.float32, device=p.device)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            lp, big_p = _chunk_logprobs(p[rows], lse[0, rows])
            lq, big_q = _chunk_logprobs(q[rows], lse[1, rows])
            out[rows] = _pair_terms(lp, lq, beta, want_p=False, want_q=False, big_p=big_p, big_q=big_q)[0]
        ctx.save_for_backward(p, q, lse)
        ctx.beta, ctx.step = beta, step
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        p, q, lse = ctx.saved_tensors
        want_p, want_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gp = torch.empty_like(p) if want_p else None
        gq = torch.empty_like(q) if want_q else None
        for start in range(0, p.shape[0], ctx.step):
            rows = slice(start, start + ctx.step)
            lp = p[rows].to(torch.float32, copy=True).sub_(lse[0, rows, None])
            lq = q[rows].to(torch.float32, copy=True).sub_(lse[1, rows, None])
            _, dp, dq = _pair_terms(lp, lq, ctx.beta, want_p=want_p, want_q=want_q)
            g = grad[rows, None].float()
            dead = (g == 0).squeeze(1)  # rows masked out upstream stay exactly zero, whatever their logits hold
            for dest, d in ((gp, dp), (gq, dq)):
                if dest is not None and d is not None:
                    d.mul_(g)
                    if dead.any():
                        d[dead] = 0.0
                    dest[rows].copy_(d)
        return gp, gq, None, None


def _chunk_logprobs(logits: torch.Tensor, lse_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(log-softmax, softmax)`` of a chunk of rows with one exp pass; stores each row's
    log-normaliser in ``lse_out``."""
    z = logits.to(torch.float32, copy=True)  # a copy even of float32 input: it is overwritten below
    top = z.amax(-1, keepdim=True).nan_to_num_(0.0, posinf=0.0, neginf=0.0)  # rows of -inf stay -inf, not NaN
    e = z.sub_(top).exp()
    log_total = e.sum(-1, keepdim=True).log_()
    lse_out.copy_((top + log_total).squeeze(-1))
    return z.sub_(log_total), e.div_(log_total.exp())


def _pair_terms(
    lp: torch.Tensor, lq: torch.Tensor, beta: float | None, *, want_p: bool, want_q: bool,
    big_p: torch.Tensor | None = None, big_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row values and the gradients asked for (with respect to each logit row) from the log-probs (and the
    probabilities, when already at hand); see ``_ChunkedPair``. May overwrite ``lp`` and ``lq``."""
    big_p = lp.exp() if big_p is None else big_p
    if beta is None:
        diff = (lp - lq).masked_fill_(big_p == 0, 0.0)  # 0 log 0 = 0
        value = (big_p * diff).sum(-1)
        dq = (lq.exp_() if big_q is None else big_q).sub_(big_p) if want_q else None
        dp = diff.sub_(value[:, None]).mul_(big_p) if want_p else None
        return value, dp, dq
    big_q = lq.exp() if big_q is None else big_q
    lm = _log_mixture(lp, lq, math.log1p(-beta), math.log(beta))
    a = (lp - lm).masked_fill_(big_p == 0, 0.0)
    c = lq.sub_(lm).masked_fill_(big_q == 0, 0.0)
    kl_s, kl_t = (big_p * a).sum(-1), (big_q * c).sum(-1)
    value = beta * kl_t + (1.0 - beta) * kl_s
    dp = a.sub_(kl_s[:, None]).mul_(big_p).mul_(1.0 - beta) if want_p else None
    dq = c.sub_(kl_t[:, None]).mul_(big_q).mul_(beta) if want_q else None
    return value, dp, dq


def _pair_divergence(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    beta: float | None,
    *,
    names: tuple[str, str],
    chunk_size: int | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """KL(P || Q) or JSD(beta) of (P, Q) per position through ``_ChunkedPair``: ``[..., V] -> [...]``."""
    _pair(p_logits, q_logits, names)
    lead, vocab = p_logits.shape[:-1], p_logits.shape[-1]
    step = rows_per_chunk(vocab, chunk_size, p_logits.device)
    flat_p, flat_q = p_logits.reshape(-1, vocab), q_logits.reshape(-1, vocab)
    out = _ChunkedPair.apply(flat_p, flat_q, beta, step).reshape(lead)
    if mask is not None:
        m = _checks.mask(mask, "mask", lead, allow_empty=True)
        out = torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))
    _checks.finite(out.detach(), f"divergence of ({names[0]}, {names[1]}) (NaN/inf logits)")
    return out


def kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(P || Q) = sum_x P(x) log(P(x)/Q(x)) per position: ``[..., V], [..., V] -> [...]`` float32."""
    return _pair_divergence(p_logits, q_logits, None, names=("p_logits", "q_logits"), chunk_size=chunk_size, mask=mask)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward (mass-covering) KL(T || S) of distillation per position, float32 ``[...]``."""
    return _pair_divergence(teacher_logits, student_logits, None, names=("teacher_logits", "student_logits"),
                            chunk_size=chunk_size, mask=mask)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse (mode-seeking) KL(S || T) of distillation per position, float32 ``[...]``."""
    return _pair_divergence(student_logits, teacher_logits, None, names=("student_logits", "teacher_logits"),
                            chunk_size=chunk_size, mask=mask)


def js(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Jensen-Shannon divergence with M = (P + Q)/2, natural log, in [0, ln 2]; float32 ``[...]``."""
    return _pair_divergence(p_logits, q_logits, 0.5, names=("p_logits", "q_logits"), chunk_size=chunk_size, mask=mask)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised JSD of GKD (Agarwal et al.; TRL's ``generalized_jsd_loss``), float32 ``[...]``.

    For 0 < beta < 1: M = beta T + (1 - beta) S and JSD = beta KL(T || M) + (1 - beta) KL(S || M).
    The endpoints follow GKD's convention, not continuity: beta = 0 returns the forward KL(T || S) and
    beta = 1 the reverse KL(S || T) (the interior value itself tends to 0 at both ends; it behaves like
    beta KL(T || S) near 0 and (1 - beta) KL(S || T) near 1). Swapping student and teacher maps beta
    to 1 - beta; beta = 0.5 is ``js``.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ConfigError(f"beta must be a number in [0, 1], got {beta!r}")
    b = float(beta)
    if b == 0.0:
        return forward_kl(student_logits, teacher_logits, chunk_size=chunk_size, mask=mask)
    if b == 1.0:
        return reverse_kl(student_logits, teacher_logits, chunk_size=chunk_size, mask=mask)
    return _pair_divergence(student_logits, teacher_logits, b, names=("student_logits", "teacher_logits"),
                            chunk_size=chunk_size, mask=mask)


def alpha_divergence(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    alpha: float,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Amari alpha-divergence (1 - sum P^alpha Q^(1-alpha)) / (alpha (1 - alpha)), alpha in (0, 1).

    Tends to KL(P || Q) as alpha -> 1 and to KL(Q || P) as alpha -> 0; alpha = 0.5 is four times the
    squared Hellinger distance. Computed as -expm1(logsumexp(alpha log P + (1-alpha) log Q)) so it
    stays accurate near the endpoints. Float32 ``[...]``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha must be a number strictly between 0 and 1, got {alpha!r}; use kl() at the endpoints")
    a = float(alpha)

    def rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        mixed = a * _lsm(p) + (1.0 - a) * _lsm(q)
        return -torch.expm1(torch.logsumexp(mixed, dim=-1)) / (a * (1.0 - a))

    return _per_position(
        rows, p_logits, q_logits, names=("p_logits", "q_logits"),
        chunk_size=chunk_size, checkpoint=checkpoint, mask=mask,
    )


def f_divergence(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    f: Generator,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """D_f(P || Q) = sum_x Q(x) f(P(x) / Q(x)) for a convex generator ``f`` with f(1) = 0.

    ``f`` maps a float32 tensor of ratios u = P/Q (elementwise) to f(u). Examples: ``u * log(u)``
    gives KL(P || Q); ``-log(u)`` gives KL(Q || P). The ratio is formed as exp(log P - log Q), so it
    overflows to inf where Q underflows; a generator that is not finite there raises
    ``NonFiniteError``. Float32 ``[...]``.
    """
    if not callable(f):
        raise ConfigError(f"f must be a callable generator u -> f(u), got {type(f).__name__}")

    def rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        lp = _lsm(p)
        lq = _lsm(q)
        return (lq.exp() * f(torch.exp(lp - lq))).sum(-1)

    return _per_position(
        rows, p_logits, q_logits, names=("p_logits", "q_logits"),
        chunk_size=chunk_size, checkpoint=checkpoint, mask=mask,
    )


def kl_estimate(
    logp_sampler: torch.Tensor,
    logp_other: torch.Tensor,
    kind: str = "k3",
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample estimate of KL(sampler || other) from tokens drawn from the sampler (Schulman).

    With r = log other(x) - log sampler(x) at the sampled x: ``k1 = -r`` (unbiased, high variance,
    can be negative), ``k2 = r^2 / 2`` (biased, low variance, its gradient is the KL gradient in
    expectation), ``k3 = exp(r) - 1 - r`` (unbiased, non-negative; verl's ``low_var_kl`` before
    clamping). Inputs are per-token log-probs of the same shape; returns float32 of that shape, zero
    where ``mask`` is False.
    """
    _checks.floating(logp_sampler, "logp_sampler")
    _checks.floating(logp_other, "logp_other")
    _checks.same_shape(logp_sampler, "logp_sampler", logp_other, "logp_other")
    if kind not in ("k1", "k2", "k3"):
        raise ConfigError(f"kind must be one of 'k1', 'k2', 'k3', got {kind!r}")
    keep = None if mask is None else _checks.mask(mask, "mask", logp_sampler.shape, allow_empty=True)
    a, b = logp_sampler.float(), logp_other.float()
    if keep is not None:
        a = torch.where(keep, a, torch.zeros_like(a))
        b = torch.where(keep, b, torch.zeros_like(b))
    _checks.finite(a.detach(), "logp_sampler")
    _checks.finite(b.detach(), "logp_other")
    r = b - a
    if kind == "k1":
        out = -r
    elif kind == "k2":
        out = 0.5 * r * r
    else:
        out = torch.expm1(r) - r
    _checks.finite(out.detach(), f"{kind} estimate (exp of a log-ratio above ~88 overflows float32; clamp the ratio)")
    return out


__all__ = [
    "alpha_divergence",
    "f_divergence",
    "forward_kl",
    "generalized_jsd",
    "js",
    "kl",
    "kl_estimate",
    "reverse_kl",
]
