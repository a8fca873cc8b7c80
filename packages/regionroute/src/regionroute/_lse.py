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


class _AttentionWithLogSumExp(torch.autograd.Function):
    """``(softmax(scale q k^T) v, logsumexp_k(scale q k^T))`` from torch's fused CPU attention kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the logsumexp), both differentiable.

    The backward is one fused attention backward: the logsumexp's gradient ``g`` enters through the row
    term ``D_i = rowsum(dO_i * O_i)`` of the softmax backward. With one extra value column of zeros, an
    extra output column of ones and an extra ``dO`` column ``-g``, the kernel's ``D_i`` becomes
    ``D_i - g_i``, so ``dS = P (dP - D + g)``: the output's and the logsumexp's score gradients at once.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        extra_out = out.new_ones(*out.shape[:-1], 1)
        extra_grad = out.new_zeros(*out.shape[:-1], 1) if grad_lse is None else -grad_lse.to(out.dtype)[..., None]
        # the kernel wants one head size: q, k, v get a zero column too (the scores do not change)
        q2, k2, v2 = (torch.cat([t, t.new_zeros(*t.shape[:-1], 1)], -1) for t in (q, k, v))
        out2, grad2 = torch.cat([out, extra_out], -1), torch.cat([grad_out, extra_grad], -1)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad2, q2, k2, v2, out2, lse, 0.0, False, scale=ctx.scale
        )
        d = q.shape[-1]
        return dq[..., :d], dk[..., :d], dv[..., :d], None


def fused_attention_available(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`attention_with_logsumexp` has a fused kernel for these inputs: CPU without a mask (the
    CUDA kernels return a logsumexp too but are not wired here: on GPUs full mode takes the chunked pass)."""
    return mask is None and q.device.type == "cpu"


def attention_with_logsumexp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, H, Lq, D]`` and per-query logsumexp ``[B, H, Lq]`` (float32) of ``q [B, H, Lq, D]``,
    ``k, v [B, H, Lk, D]`` from one fused kernel (torch's CPU flash attention); the backward is one fused
    kernel call too."""
    return _AttentionWithLogSumExp.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale)
