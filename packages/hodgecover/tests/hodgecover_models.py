"""Tiny Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE models for the hodgecover tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

COMMON = dict(
    vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    num_experts_per_tok=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def moe_model(family: str = "mixtral", experts: int = 6, seed: int = 0, dtype=torch.float64):
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=24, num_local_experts=experts, **COMMON)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=16,
                             num_experts=experts, **COMMON)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=experts, head_dim=8, **COMMON)
    elif family == "olmoe":
        cfg = OlmoeConfig(intermediate_size=12, num_experts=experts, **COMMON)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if dtype == torch.float64:  # the default grouped-mm expert kernel has no float64 path
        model.set_experts_implementation("eager")
    with torch.no_grad():  # larger weights than the default init so that merges matter
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]

# The models here are tiny: intra-op threads only add synchronisation (and spin on a shared CPU).
torch.set_num_threads(1)

