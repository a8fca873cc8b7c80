"""Fused Triton kernel for per-token log-prob and entropy (private; used on CUDA when triton is installed).

One program per row streams the row's logits once in blocks, keeping a running max ``m``, the running
sum ``s = sum exp(x - m)`` and ``w = sum exp(x - m) x`` (online softmax), so

    lse = m + log s,   log p(token) = x[token] - lse,   entropy = lse - w / s

with no ``[N, V]`` temporary at all. Backward recomputes softmax one chunk of rows at a time in torch:
d logp(tok)/dz = onehot - p and d H/dz = -p (log p + H), both times 1/T for temperature T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
BACKWARD_ROWS = 64


@triton.jit
def _logprob_entropy_kernel(
    logits_ptr, tokens_ptr, lp_ptr, ent_ptr, lse_ptr,
    rows_per_batch, stride_batch, stride_row, vocab, inv_t,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // rows_per_batch) * stride_batch + (row % rows_per_batch) * stride_row
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        new_m = tl.maximum(m, tl.max(x, 0))
        # -inf logits (masked vocabulary, or padding) have p = 0 and add nothing; guard -inf - -inf
        finite = x > float("-inf")
        rescale = tl.where(new_m > float("-inf"), tl.exp(m - new_m), 1.0)
        e = tl.where(finite, tl.exp(x - new_m), 0.0)
        s = s * rescale + tl.sum(e, 0)
        w = w * rescale + tl.sum(tl.where(finite, e * x, 0.0), 0)
        m = new_m
    lse = m + tl.log(s)
    token = tl.load(tokens_ptr + row)
    x_tok = tl.load(base + token).to(tl.float32) * inv_t
    tl.store(lp_ptr + row, x_tok - lse)
    tl.store(ent_ptr + row, lse - w / s)
    tl.store(lse_ptr + row, lse)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """``[..., T, V]`` as ``[B, T, V]`` with unit stride over V (a view whenever possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-2], x.shape[-1])


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, inv_t: float):  # type: ignore[override]
        x = _as_3d(logits)
        b, t, v = x.shape
        ids = tokens.reshape(-1).contiguous()
        lp = torch.empty(b * t, dtype=torch.float32, device=x.device)
        ent = torch.empty_like(lp)
        lse = torch.empty_like(lp)
        if b * t:
            _logprob_entropy_kernel[(b * t,)](
                x, ids, lp, ent, lse, t, x.stride(0), x.stride(1), v, inv_t, BLOCK=min(BLOCK, triton.next_power_of_2(v)),
                num_warps=8 if v >= 8192 else 4,
            )
        ctx.save_for_backward(logits, ids, lse, ent)
        ctx.inv_t = inv_t
        return lp.reshape(tokens.shape), ent.reshape(tokens.shape)

    @staticmethod
    def backward(ctx, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None):  # type: ignore[override]
        logits, ids, lse, ent = ctx.saved_tensors
        inv_t = ctx.inv_t
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        grad = torch.empty_like(flat)
        g_lp = None if g_lp is None else g_lp.reshape(-1).float()
        g_ent = None if g_ent is None else g_ent.reshape(-1).float()
        for s in range(0, flat.shape[0], BACKWARD_ROWS):
            sl = slice(s, s + BACKWARD_ROWS)
            logp = flat[sl].float() * inv_t - lse[sl, None]
            p = logp.exp()
            gz = torch.zeros_like(p)
            if g_lp is not None:
                gz -= p * g_lp[sl, None]
                gz.scatter_add_(-1, ids[sl, None], g_lp[sl, None])
            if g_ent is not None:
                gz -= torch.where(p > 0, p * (logp + ent[sl, None]), 0.0) * g_ent[sl, None]
            grad[sl] = (gz * inv_t).to(grad.dtype)
        return grad.reshape(logits.shape), None, None


def logprob_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(token), entropy)`` float32 of logits ``[..., T, V]`` at temperature 1 / inv_t."""
    return _LogprobEntropy.apply(logits, tokens, inv_t)
