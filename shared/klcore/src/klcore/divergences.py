"""Divergences between categorical distributions given as logits, and sample-based KL estimators.

Full-distribution functions take two ``[..., V]`` logit tensors (any float dtype, same shape) and
return one float32 value per position, shape ``[...]``, in nats. They run over chunks of rows and
upcast one chunk at a time, so no float32 ``[..., V]`` copy is ever materialised. The KL family
(``kl``, ``forward_kl``, ``reverse_kl``, ``js``, ``generalized_jsd``) has closed-form gradients computed
in the same pass as the value, so no log-softmax is ever recomputed and nothing float32 ``[..., V]`` is
held (``checkpoint`` changes nothing there). On CUDA with triton installed they run fused kernels that
stream each row in blocks and allocate nothing ``[..., V]`` but the gradients (``KLCORE_DISABLE_FUSED=1``
uses the chunked path). For ``alpha_divergence`` and ``f_divergence`` pass ``checkpoint=True`` to recompute
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
from klcore.logprobs import _use_fused

Generator = Callable[[torch.Tensor], torch.Tensor]

#: float32 work elements per chunk of the KL family when ``chunk_size`` is not given: 2 MiB on the CPU
#: (16 rows at V = 32k, 4 at 128k: the fastest of 1-64 rows measured there), 32 MiB on accelerators
PAIR_CHUNK_ELEMENTS = {"cpu": 1 << 19, "accelerator": 1 << 23}


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
    logits, a chunk of rows at a time in float32 with closed-form gradients.

    One pass: each chunk's log-probs are computed once, and where an input needs a gradient its
    gradient for a unit upstream gradient is written then, in the input's dtype; backward only scales
    those rows by the upstream gradient. So nothing float32 ``[N, V]`` is ever held, the gradients
    take what the inputs take, and no log-softmax is recomputed. With lp, lq the log-probs and v the
    row's value:

    * KL: dv/dz_p = P (lp - lq - v), dv/dz_q = Q - P;
    * JSD(beta), M = beta T + (1 - beta) S: dv/dz_s = (1 - beta) S (a - sum S a) with a = ls - lm, and
      dv/dz_t = beta T (c - sum T c) with c = lt - lm (0 log 0 = 0 throughout).
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, q: torch.Tensor, beta: float | None, step: int) -> torch.Tensor:  # type: ignore[override]
        want_p, want_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = p.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=p.device)
        gp = torch.empty_like(p) if want_p else None
        gq = torch.empty_like(q) if want_q else None
        for start in range(0, n, step):
            rows = slice(start, start + step)
            value, dp, dq = _chunk_terms(p[rows], q[rows], beta, want_p=want_p, want_q=want_q)
            out[rows] = value
            for dest, d in ((gp, dp), (gq, dq)):
                if dest is not None and d is not None:
                    dest[rows].copy_(d)
        ctx.save_for_backward(*(g for g in (gp, gq) if g is not None))
        ctx.wants, ctx.step = (want_p, want_q), step
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        stored = iter(ctx.saved_tensors)
        # rows masked out upstream get exactly zero, whatever their logits held
        scale = grad.to(torch.float32)[:, None]
        any_dead = bool((scale == 0).any())
        grads: list[torch.Tensor | None] = []
        for wanted in ctx.wants:
            unit = next(stored) if wanted else None
            if unit is None:
                grads.append(None)
                continue
            g = torch.empty_like(unit)  # not in place: a retained graph can run backward again
            for start in range(0, unit.shape[0], ctx.step):
                rows = slice(start, start + ctx.step)
                part = unit[rows].float() * scale[rows]
                g[rows].copy_(part.masked_fill_(scale[rows] == 0, 0.0) if any_dead else part)
            grads.append(g)
        return grads[0], grads[1], None, None


def _chunk_terms(
    p: torch.Tensor, q: torch.Tensor, beta: float | None, *, want_p: bool, want_q: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row values and asked-for gradients of one chunk of logit rows. The fast path assumes finite
    log-probs; a row where that fails (a -inf logit: 0 log 0) is redone with the zero terms masked."""
    lp, big_p = _chunk_logprobs(p)
    lq, big_q = _chunk_logprobs(q)
    value, dp, dq = _pair_terms(lp, lq, beta, want_p=want_p, want_q=want_q, big_p=big_p, big_q=big_q)
    if not bool(torch.isfinite(value).all()):
        lp, big_p = _chunk_logprobs(p)
        lq, big_q = _chunk_logprobs(q)
        value, dp, dq = _pair_terms(lp, lq, beta, want_p=want_p, want_q=want_q, big_p=big_p, big_q=big_q,
                                    exact_zeros=True)
    return value, dp, dq


def _chunk_logprobs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(log-softmax, softmax)`` of a chunk of rows with one exp pass."""
    z = logits.to(torch.float32, copy=True)  # a copy even of float32 input: it is overwritten below
    top = z.amax(-1, keepdim=True).nan_to_num_(0.0, posinf=0.0, neginf=0.0)  # rows of -inf stay -inf, not NaN
    e = z.sub_(top).exp()
    log_total = e.sum(-1, keepdim=True).log_()
    return z.sub_(log_total), e.div_(log_total.exp())


def _pair_terms(
    lp: torch.Tensor, lq: torch.Tensor, beta: float | None, *, want_p: bool, want_q: bool,
    big_p: torch.Tensor, big_q: torch.Tensor, exact_zeros: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row values and the gradients asked for (with respect to each logit row) from the log-probs and
    probabilities; see ``_ChunkedPair``. ``exact_zeros`` applies 0 log 0 = 0 where a probability is 0
    (needed only where a log-prob is -inf). Overwrites ``lp`` and ``lq``."""
    if beta is None:
        diff = lp.sub_(lq)
        if exact_zeros:
            diff.masked_fill_(big_p == 0, 0.0)
        value = (big_p * diff).sum(-1)
        dq = big_q.sub_(big_p) if want_q else None
        dp = diff.sub_(value[:, None]).mul_(big_p) if want_p else None
        return value, dp, dq
    if exact_zeros:
        lm = _log_mixture(lp, lq, math.log1p(-beta), math.log(beta))
    else:
        lm = torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
    a = lp.sub_(lm)
    c = lq.sub_(lm)
    if exact_zeros:
        a.masked_fill_(big_p == 0, 0.0)
        c.masked_fill_(big_q == 0, 0.0)
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
    flat_p, flat_q = p_logits.reshape(-1, vocab), q_logits.reshape(-1, vocab)
    if _use_fused(flat_p) and flat_q.is_cuda:
        from klcore._fused_pair import pair_divergence

        out = pair_divergence(flat_p, flat_q, beta).reshape(lead)
    else:
        step = rows_per_chunk(vocab, chunk_size, p_logits.device, elements=PAIR_CHUNK_ELEMENTS)
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
