"""CUDA paths (skipped without a GPU; CI has none): chunked math in bf16 on the device, its memory,
and a mixed-precision trainer step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klcore.divergences import generalized_jsd, kl
from klcore.logprobs import DISABLE_FUSED_ENV, token_entropy, token_logprobs, token_logprobs_and_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("fused", [True, False])
def test_logprobs_bf16_on_cuda_match_float64_and_stay_small(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not fused:
        monkeypatch.setenv(DISABLE_FUSED_ENV, "1")
    torch.manual_seed(0)
    logits = (torch.randn(8, 1024, 32768, device="cuda") * 3).bfloat16()
    tokens = torch.randint(0, 32768, (8, 1024), device="cuda")
    (lp, ent), peak = _peak_extra(lambda: token_logprobs_and_entropy(logits, tokens))
    full_fp32 = logits.numel() * 4
    assert peak < (0.001 if fused else 0.25) * full_fp32  # never a float32 copy of the whole [B, T, V]
    for b in range(0, 8, 4):  # float64 reference a slice at a time
        ref = torch.log_softmax(logits[b : b + 4].double(), -1)
        torch.testing.assert_close(lp[b : b + 4], ref.gather(-1, tokens[b : b + 4, :, None]).squeeze(-1).float(),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent[b : b + 4], -(ref.exp() * ref).sum(-1).float(), rtol=1e-4, atol=1e-4)


def test_fused_gradients_match_chunked_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    base = torch.randn(4, 130, 50000, device="cuda")
    logits = base[:, 2:].detach().requires_grad_()  # a non-contiguous slice
    tokens = torch.randint(0, 50000, (4, 128), device="cuda")
    g1, g2 = torch.randn(4, 128, device="cuda"), torch.randn(4, 128, device="cuda")
    lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=0.8)
    (grad_fused,) = torch.autograd.grad((lp * g1 + ent * g2).sum(), logits)
    monkeypatch.setenv(DISABLE_FUSED_ENV, "1")
    lp2, ent2 = token_logprobs_and_entropy(logits, tokens, temperature=0.8)
    (grad_torch,) = torch.autograd.grad((lp2 * g1 + ent2 * g2).sum(), logits)
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fused, grad_torch, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert float(token_entropy(logits).min()) > 0 and float(token_logprobs(logits, tokens).max()) < 0


def test_divergences_bf16_on_cuda_match_float64() -> None:
    torch.manual_seed(0)
    s = (torch.randn(2, 64, 8192, device="cuda") * 2).bfloat16()
    t = (torch.randn(2, 64, 8192, device="cuda") * 2).bfloat16()
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    torch.testing.assert_close(kl(s, t), (ls.exp() * (ls - lt)).sum(-1).float(), rtol=1e-4, atol=1e-5)
    beta = 0.3
    lm = torch.logaddexp(ls + torch.log(torch.tensor(1 - beta, dtype=torch.float64)),
                         lt + torch.log(torch.tensor(beta, dtype=torch.float64)))
    ref = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    torch.testing.assert_close(generalized_jsd(s, t, beta), ref.float(), rtol=1e-4, atol=1e-5)


def test_grpo_step_on_cuda_in_bf16(tmp_path: Path) -> None:
    from klcore.plugins import build_plugin_manager
    from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
    from klcore.trainer import GRPOConfig, GRPOTrainer

    model = tiny_causal_lm(tiny_config("small"), seed=0)
    cfg = GRPOConfig(steps=2, prompts_per_step=8, group_size=4, mixed_precision="bf16", progress=False)
    trainer = GRPOTrainer(model, char_tokenizer(), AdditionTask(digits=1), cfg, run_dir=tmp_path,
                          plugins=build_plugin_manager(load_entrypoints=False))
    assert trainer.accelerator.device.type == "cuda"
    rows = trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert next(trainer.unwrapped_model.parameters()).device.type == "cuda"


def test_fused_kernel_with_minus_inf_logits() -> None:
    torch.manual_seed(0)
    row = torch.randn(2, 3, 10000, device="cuda")
    row[..., :4096] = float("-inf")  # a whole first block masked
    row[..., 5000:5100] = float("-inf")
    x = row.detach().requires_grad_()
    tokens = torch.full((2, 3), 7000, device="cuda")
    lp, ent = token_logprobs_and_entropy(x, tokens)
    ref = torch.log_softmax(row.double(), -1)
    p = ref.exp()
    ref_ent = -(p * torch.where(p > 0, ref, torch.zeros((), dtype=torch.float64, device="cuda"))).sum(-1)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.double(), ref[..., 7000], rtol=1e-5, atol=1e-5)
    (lp + ent).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[..., :4096] == 0).all()


@pytest.mark.parametrize("beta", [None, 0.5])
def test_fused_divergences_match_the_chunked_path_and_hold_only_the_gradient(
    beta: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused KL / JSD kernels equal the chunked torch path (values and both gradients); forward
    allocates nothing [N, V], forward + backward nothing beyond the gradient itself."""
    from klcore.divergences import reverse_kl

    torch.manual_seed(0)
    s = (torch.randn(2048, 32768, device="cuda") * 2).bfloat16().requires_grad_()
    t = (torch.randn(2048, 32768, device="cuda") * 2).bfloat16()
    fn = (lambda a, b: reverse_kl(a, b)) if beta is None else (lambda a, b: generalized_jsd(a, b, beta))
    weights = torch.rand(2048, device="cuda")
    with torch.no_grad():
        _, forward_peak = _peak_extra(lambda: fn(s, t))
    assert forward_peak < 1e-3 * s.numel() * 4
    out, peak = _peak_extra(lambda: torch.autograd.grad((fn(s, t) * weights).sum(), s)[0])
    assert peak < 1.05 * s.numel() * s.element_size()  # the bf16 gradient and nothing else of its size
    monkeypatch.setenv(DISABLE_FUSED_ENV, "1")
    value = fn(s, t)
    (chunked,) = torch.autograd.grad((value * weights).sum(), s)
    monkeypatch.delenv(DISABLE_FUSED_ENV)
    torch.testing.assert_close(fn(s, t), value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), chunked.float(), rtol=2e-2, atol=1e-6)
