"""Fused Triton kernels for KL(P || Q) and the generalised JSD(beta) of two logit rows (private; used by
``klcore.divergences`` on CUDA when triton is installed).

Forward: one program per row streams both rows twice in blocks. The first pass keeps online softmax
sums (running max ``m``, ``s = sum exp(x - m)``) for the log-normalisers; the second accumulates, with
lp, lq the log-probs,

    KL:        v = sum P (lp - lq)
    JSD(beta): kl_s = sum S (ls - lm), kl_t = sum T (lt - lm), v = beta kl_t + (1 - beta) kl_s,
               lm = log((1 - beta) S + beta T)

(0 log 0 = 0). Backward reads the rows once more and writes the closed-form gradients times the
upstream gradient straight into the inputs' dtype (see ``klcore.divergences._ChunkedPair``), from four
saved floats per row. Nothing of size ``[N, V]`` is allocated but the gradients themselves.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 4096
NEG_INF = float("-inf")


@triton.jit
def _online_sums(m, s, x):
    """Fold a block ``x`` into the running max ``m`` and sum ``s`` of exp(x - m); -inf adds nothing."""
    new_m = tl.maximum(m, tl.max(x, 0))
    rescale = tl.where(new_m > float("-inf"), tl.exp(m - new_m), 1.0)
    e = tl.where(x > float("-inf"), tl.exp(x - new_m), 0.0)
    return new_m, s * rescale + tl.sum(e, 0)


@triton.jit
def _log_mixture(lp, lq, log_wp, log_wq):
    """log(w_p P + w_q Q) from log-probs; -inf where both are 0 (every use of it then carries a 0)."""
    a = lp + log_wp
    b = lq + log_wq
    top = tl.maximum(a, b)
    safe = tl.where(top > float("-inf"), top, 0.0)
    return tl.where(top > float("-inf"), safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)), float("-inf"))


@triton.jit
def _pair_forward_kernel(
    p_ptr, q_ptr, out_ptr, aux_ptr, vocab, beta, log_wp, log_wq,
    IS_JSD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * vocab
    q_row = q_ptr + row * vocab
    mp = tl.full((), float("-inf"), tl.float32)
    mq = tl.full((), float("-inf"), tl.float32)
    sp = tl.zeros((), tl.float32)
    sq = tl.zeros((), tl.float32)
    nans = tl.zeros((), tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab
        x = tl.load(p_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        y = tl.load(q_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        nans += tl.sum((x != x).to(tl.int32), 0) + tl.sum((y != y).to(tl.int32), 0)
        mp, sp = _online_sums(mp, sp, x)
        mq, sq = _online_sums(mq, sq, y)
    lse_p = mp + tl.log(sp)
    lse_q = mq + tl.log(sq)
    acc_p = tl.zeros((), tl.float32)
    acc_q = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab
        lp = tl.load(p_row + cols, mask=valid, other=float("-inf")).to(tl.float32) - lse_p
        lq = tl.load(q_row + cols, mask=valid, other=float("-inf")).to(tl.float32) - lse_q
        big_p = tl.where(lp > float("-inf"), tl.exp(lp), 0.0)
        if IS_JSD:
            big_q = tl.where(lq > float("-inf"), tl.exp(lq), 0.0)
            lm = _log_mixture(lp, lq, log_wp, log_wq)
            acc_p += tl.sum(tl.where(big_p > 0, big_p * (lp - lm), 0.0), 0)
            acc_q += tl.sum(tl.where(big_q > 0, big_q * (lq - lm), 0.0), 0)
        else:
            acc_p += tl.sum(tl.where(big_p > 0, big_p * (lp - lq), 0.0), 0)
    value = acc_p
    if IS_JSD:
        value = beta * acc_q + (1.0 - beta) * acc_p
    # NaN logits, or a row without any finite logit, give NaN (the caller raises NonFiniteError)
    broken = (nans > 0) | (sp == 0) | (sq == 0)
    tl.store(out_ptr + row, tl.where(broken, float("nan"), value))
    tl.store(aux_ptr + 4 * row, lse_p)
    tl.store(aux_ptr + 4 * row + 1, lse_q)
    tl.store(aux_ptr + 4 * row + 2, acc_p)
    tl.store(aux_ptr + 4 * row + 3, acc_q)


@triton.jit
def _pair_backward_kernel(
    p_ptr, q_ptr, gp_ptr, gq_ptr, grad_ptr, aux_ptr, vocab, beta, log_wp, log_wq,
    IS_JSD: tl.constexpr, WANT_P: tl.constexpr, WANT_Q: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * vocab
    q_row = q_ptr + row * vocab
    g = tl.load(grad_ptr + row).to(tl.float32)
    lse_p = tl.load(aux_ptr + 4 * row)
    lse_q = tl.load(aux_ptr + 4 * row + 1)
    acc_p = tl.load(aux_ptr + 4 * row + 2)
    acc_q = tl.load(aux_ptr + 4 * row + 3)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab
        lp = tl.load(p_row + cols, mask=valid, other=float("-inf")).to(tl.float32) - lse_p
        lq = tl.load(q_row + cols, mask=valid, other=float("-inf")).to(tl.float32) - lse_q
        big_p = tl.where(lp > float("-inf"), tl.exp(lp), 0.0)
        big_q = tl.where(lq > float("-inf"), tl.exp(lq), 0.0)
        if IS_JSD:
            lm = _log_mixture(lp, lq, log_wp, log_wq)
            dp = (1.0 - beta) * tl.where(big_p > 0, big_p * (lp - lm - acc_p), 0.0)
            dq = beta * tl.where(big_q > 0, big_q * (lq - lm - acc_q), 0.0)
        else:
            dp = tl.where(big_p > 0, big_p * (lp - lq - acc_p), 0.0)
            dq = big_q - big_p
        # a row masked out upstream (g = 0) gets exactly 0, whatever its logits hold
        if WANT_P:
            tl.store(gp_ptr + row * vocab + cols, tl.where(g == 0, 0.0, dp * g).to(gp_ptr.dtype.element_ty), mask=valid)
        if WANT_Q:
            tl.store(gq_ptr + row * vocab + cols, tl.where(g == 0, 0.0, dq * g).to(gq_ptr.dtype.element_ty), mask=valid)


def _weights(beta: float | None) -> tuple[float, float, float]:
    """(beta, log(1 - beta), log beta) as kernel scalars; KL ignores them."""
    if beta is None:
        return 0.0, 0.0, 0.0
    return beta, math.log1p(-beta), math.log(beta)


class FusedPair(torch.autograd.Function):
    """``[N, V], [N, V] -> [N]`` float32: KL(P || Q) (``beta`` None) or JSD(beta) of (P, Q), on CUDA."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, q: torch.Tensor, beta: float | None) -> torch.Tensor:  # type: ignore[override]
        p, q = p.contiguous(), q.contiguous()
        n, vocab = p.shape
        out = torch.empty(n, dtype=torch.float32, device=p.device)
        aux = torch.empty((n, 4), dtype=torch.float32, device=p.device)
        b, log_wp, log_wq = _weights(beta)
        if n:
            _pair_forward_kernel[(n,)](
                p, q, out, aux, vocab, b, log_wp, log_wq,
                IS_JSD=beta is not None, BLOCK=min(BLOCK, triton.next_power_of_2(vocab)),
                num_warps=8 if vocab >= 8192 else 4,
            )
        ctx.save_for_backward(p, q, aux)
        ctx.beta = beta
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        p, q, aux = ctx.saved_tensors
        want_p, want_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = p.shape
        gp = torch.empty_like(p) if want_p else None
        gq = torch.empty_like(q) if want_q else None
        b, log_wp, log_wq = _weights(ctx.beta)
        if n and (want_p or want_q):
            _pair_backward_kernel[(n,)](
                p, q, gp if gp is not None else p, gq if gq is not None else q, grad.contiguous(), aux,
                vocab, b, log_wp, log_wq, IS_JSD=ctx.beta is not None, WANT_P=want_p, WANT_Q=want_q,
                BLOCK=min(BLOCK, triton.next_power_of_2(vocab)), num_warps=8 if vocab >= 8192 else 4,
            )
        return gp, gq, None


def pair_divergence(p: torch.Tensor, q: torch.Tensor, beta: float | None) -> torch.Tensor:
    """Per-row KL(P || Q) or JSD(beta) of ``[N, V]`` logits, float32 ``[N]``, through the fused kernels."""
    return FusedPair.apply(p, q, beta)
