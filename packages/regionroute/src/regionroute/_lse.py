"""Per-query logsumexp of scaled dot-product scores, chunked over queries in forward and backward.

The full ``[B, H, Nq, Lk]`` score matrix is never held: each chunk of ``chunk`` queries is
materialised, reduced and dropped; the backward pass recomputes the chunk's probabilities.
"""

from __future__ import annotations

from typing import Any

import torch


class _ChunkedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
        qf, kf = q.float(), k.float()
        out = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        for s in range(0, q.shape[-2], chunk):
            scores = torch.matmul(qf[..., s : s + chunk, :], kf.transpose(-1, -2)) * scale
            out[..., s : s + chunk] = torch.logsumexp(scores, dim=-1)
        ctx.save_for_backward(q, k, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        q, k, lse = ctx.saved_tensors
        qf, kf = q.float(), k.float()
        grad_q = torch.zeros_like(qf) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(kf) if ctx.needs_input_grad[1] else None
        for s in range(0, q.shape[-2], ctx.chunk):
            qc = qf[..., s : s + ctx.chunk, :]
            probs = torch.exp(torch.matmul(qc, kf.transpose(-1, -2)) * ctx.scale - lse[..., s : s + ctx.chunk, None])
            weighted = probs * grad[..., s : s + ctx.chunk, None].float() * ctx.scale  # d lse_i / d s_ik = p_ik
            if grad_q is not None:
                grad_q[..., s : s + ctx.chunk, :] = torch.matmul(weighted, kf)
            if grad_k is not None:
                grad_k += torch.matmul(weighted.transpose(-1, -2), qc)
        return (
            grad_q.to(q.dtype) if grad_q is not None else None,
            grad_k.to(k.dtype) if grad_k is not None else None,
            None,
            None,
        )


def chunked_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """``logsumexp_k(scale * q_i . k_k)`` for ``q [..., Nq, D]``, ``k [..., Lk, D]``: ``[..., Nq]`` float32."""
    return _ChunkedLogSumExp.apply(q, k, scale, chunk)
