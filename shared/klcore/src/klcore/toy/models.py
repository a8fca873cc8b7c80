"""Tiny causal-LM configs with random init, sized for CPU tests and recipes."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, PretrainedConfig, PreTrainedModel

from klcore.errors import ConfigError
from klcore.toy.tokenizer import CHARACTERS, SPECIAL_TOKENS

VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)

#: name -> (hidden size, layers, attention heads, key/value heads, MLP size)
MODEL_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (32, 1, 2, 1, 64),  # unit tests: milliseconds per step
    "small": (128, 2, 4, 2, 384),  # recipes: learns 2-digit addition in about a minute on 2 cores
}


def _dims(size: str) -> tuple[int, int, int, int, int]:
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown toy model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[size]


def tiny_config(size: str = "tiny", *, max_positions: int = 64) -> LlamaConfig:
    """A Llama config over the character vocabulary."""
    hidden, layers, heads, kv_heads, mlp = _dims(size)
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_moe_config(size: str = "tiny", *, num_experts: int = 4, top_k: int = 2, max_positions: int = 64) -> MixtralConfig:
    """A Mixtral-style sparse MoE config (``num_experts`` experts, ``top_k`` routed per token)."""
    hidden, layers, heads, kv_heads, mlp = _dims(size)
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    return MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_causal_lm(config: PretrainedConfig | None = None, *, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM for ``config`` (default ``tiny_config()``), seeded."""
    import torch

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config if config is not None else tiny_config())
