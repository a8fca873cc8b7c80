"""CUDA paths (skipped without a GPU; CI has none): chunked math in bf16 on the device, its memory,
and a mixed-precision trainer step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klcore.divergences import generalized_jsd, kl
from klcore.logprobs import token_logprobs_and_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_logprobs_bf16_on_cuda_match_float64_and_stay_small() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(4, 512, 32768, device="cuda") * 3).bfloat16()
    tokens = torch.randint(0, 32768, (4, 512), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = token_logprobs_and_entropy(logits, tokens)
    peak = torch.cuda.max_memory_allocated() - base
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(lp, ref.gather(-1, tokens[..., None]).squeeze(-1).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1).float(), rtol=1e-4, atol=1e-4)
    full_fp32 = logits.numel() * 4
    assert peak < 0.25 * full_fp32  # never a float32 copy of the whole [B, T, V]


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
