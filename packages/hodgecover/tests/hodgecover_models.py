"""Tiny Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / Ernie-4.5-MoE / DeepSeek-V3 models for the hodgecover tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Ernie4_5_MoeConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

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
    elif family == "ernie4_5_moe":  # router.moe_statics.e_score_correction_bias [1, E], a shared expert
        cfg = Ernie4_5_MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=experts,
                                 moe_num_shared_experts=1, moe_layer_start_index=0, **COMMON)
    elif family == "deepseek_v3":  # group-limited routing: n_group=2 groups, tokens pick experts in topk_group=1
        cfg = DeepseekV3Config(intermediate_size=24, moe_intermediate_size=12, n_routed_experts=experts,
                               n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                               kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, **COMMON)
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
        for name, b in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):  # non-zero, so that a mis-sliced bias changes routing
                b.normal_(0, 0.3)
    return model


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
ALL_FAMILIES = [*FAMILIES, "ernie4_5_moe", "deepseek_v3"]  # these two route with their own rules

# The models here are tiny: intra-op threads only add synchronisation (and spin on a shared CPU).
torch.set_num_threads(1)

