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
