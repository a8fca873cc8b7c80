"""The fused Triton log-prob/entropy kernel, run on the CPU through Triton's interpreter.

Skipped where triton is not installed (as in CI, whose CPU-only environment does not need it); the
same kernel is compiled and checked on a GPU by ``test_gpu.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    # with a GPU, test_gpu.py checks the compiled kernel; interpreters of older tritons reject it
    pytest.mark.skipif(torch.cuda.is_available(), reason="the compiled kernel is checked by test_gpu.py"),
]

SCRIPT = textwrap.dedent(
    """
    import torch
    from klcore import _fused
    torch.manual_seed(0)
    worst = 0.0
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        for vocab, temperature in ((37, 1.0), (5000, 0.7)):
            full = (torch.randn(2, 6, vocab) * 3).to(dtype)
            x = full[:, 1:5].detach().requires_grad_()  # a non-contiguous slice, like logits[:, P-1:-1]
            tok = torch.randint(0, vocab, (2, 4))
            lp, ent = _fused.logprob_and_entropy(x, tok, 1.0 / temperature)
            ref_x = x.detach().double().requires_grad_()
            ref = torch.log_softmax(ref_x / temperature, -1)
            ref_lp = ref.gather(-1, tok[..., None]).squeeze(-1)
            ref_ent = -(ref.exp() * ref).sum(-1)
            assert lp.dtype == ent.dtype == torch.float32
            torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=tol, atol=tol)
            torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=tol, atol=tol)
            g1, g2 = torch.randn(2, 4), torch.randn(2, 4)
            (lp * g1 + ent * g2).sum().backward()
            (ref_lp * g1.double() + ref_ent * g2.double()).sum().backward()
            gtol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in the logits' dtype
            torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=gtol, atol=gtol)
    # -inf logits (masked vocabulary), including a whole first block of 4096 columns
    row = torch.randn(1, 1, 5000)
    row[..., :4096] = float("-inf")
    row[..., 4500] = float("-inf")
    x = row.detach().requires_grad_()
    tok = torch.tensor([[4200]])
    lp, ent = _fused.logprob_and_entropy(x, tok, 1.0)
    ref = torch.log_softmax(row[..., 4096:].double(), -1)
    ref = ref[..., torch.arange(904) != 404]
    p = ref.exp()
    torch.testing.assert_close(ent.double(), -(p * ref).sum(-1), rtol=1e-5, atol=1e-5)
    (lp + ent).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[..., :4096] == 0).all()
    print("fused ok")
    """
)


def test_fused_kernel_matches_float64_values_and_gradients() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fused ok" in out.stdout


PAIR_SCRIPT = textwrap.dedent(
    """
    import math
    import torch
    from klcore import _fused_pair
    torch.manual_seed(0)

    def reference(p, q, beta):  # float64 autograd, written independently of the kernels
        lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
        P, Q = lp.exp(), lq.exp()
        # 0 log 0 = 0, with the masked terms kept out of the graph (no 0 * inf in backward)
        zero = lambda keep, x: torch.where(keep, x, torch.zeros_like(x))
        if beta is None:
            return (P * zero(P > 0, lp - lq)).sum(-1)
        M = (1 - beta) * P + beta * Q
        lm = torch.where(M > 0, M, torch.ones_like(M)).log()
        kl_p = (P * zero(P > 0, lp - lm)).sum(-1)
        kl_q = (Q * zero(Q > 0, lq - lm)).sum(-1)
        return beta * kl_q + (1 - beta) * kl_p

    for dtype, tol, gtol in ((torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-4, 1e-2)):
        for vocab in (37, 5000):
            for beta in (None, 0.3, 0.5):
                p0 = (torch.randn(6, vocab) * 2).to(dtype)
                q0 = (torch.randn(6, vocab) * 2).to(dtype)
                p0[2, :5] = float("-inf")  # a masked vocabulary in both rows
                q0[2, :5] = float("-inf")
                if beta is not None:
                    q0[3, 7] = float("-inf")  # a zero of Q alone: JSD stays finite
                p = p0.clone().requires_grad_()
                q = q0.clone().requires_grad_()
                out = _fused_pair.pair_divergence(p, q, beta)
                rp = p0.double().requires_grad_()
                rq = q0.double().requires_grad_()
                ref = reference(rp, rq, beta)
                assert out.dtype == torch.float32
                torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
                g = torch.linspace(-1.0, 2.0, 6)
                g[4] = 0.0  # a row masked out upstream
                (out * g).sum().backward()
                (ref * g.double()).sum().backward()
                assert p.grad.dtype == dtype and (p.grad[4] == 0).all() and (q.grad[4] == 0).all()
                torch.testing.assert_close(p.grad.double(), rp.grad, rtol=gtol, atol=gtol)
                torch.testing.assert_close(q.grad.double(), rq.grad, rtol=gtol, atol=gtol)
    # NaN logits and a row without finite logits give NaN values; a frozen teacher gets no gradient
    p = torch.randn(3, 100, requires_grad=True)
    q = torch.randn(3, 100)
    with torch.no_grad():
        p[0, 3] = float("nan")
        p[1] = float("-inf")
    out = _fused_pair.pair_divergence(p, q, None)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2])
    out[2].backward()
    assert q.grad is None and (p.grad[:2] == 0).all()
    print("fused pair ok")
    """
)


def test_fused_pair_kernels_match_float64_values_and_gradients() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", PAIR_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fused pair ok" in out.stdout
