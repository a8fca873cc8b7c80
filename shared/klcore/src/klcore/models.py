"""Real models for the LM trainers: load with ``from_pretrained``, LoRA through peft, save for
``from_pretrained``.

``load_causal_lm(ModelConfig(...))`` loads a hub name or a local folder with its tokenizer (dtype,
attention implementation, gradient checkpointing; ``trust_remote_code`` only when asked) and wraps the
model in a peft LoRA adapter when ``lora.r > 0``. With LoRA the reference policy is the base model with
the adapter switched off (``adapters_disabled``), not a second copy, as TRL does.
``save_final(model, tokenizer, folder, merged=...)`` writes the trained model in Hugging Face format:
the merged weights, or the adapter alone (which ``from_pretrained`` loads over its base).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from klcore.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
SAVE_MODES = ("merged", "adapter", "none")


@dataclass
class LoraConfig:
    """peft LoRA settings; ``r = 0`` trains every weight (no adapter). ``target_modules`` is peft's:
    ``"all-linear"`` or a list of module names (``["q_proj", "v_proj"]``)."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"

    def __post_init__(self) -> None:
        for name in ("r", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"lora.{name} must be an int >= 0 (r = 0: no LoRA), got {value!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.target_modules, str) or (
                isinstance(self.target_modules, list) and all(isinstance(m, str) for m in self.target_modules))):
            raise ConfigError(f"lora.target_modules must be a string or a list of names, got {self.target_modules!r}")


@dataclass
class ModelConfig:
    """What ``load_causal_lm`` loads. ``attn_implementation = ""`` keeps transformers' choice."""

    model: str = ""
    dtype: str = "auto"
    attn_implementation: str = ""
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")


def load_causal_lm(config: ModelConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from ``config.model`` (a hub name or a local folder), LoRA-wrapped when asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not config.model:
        raise ConfigError("model is empty: name a Hugging Face model or a local folder saved with save_pretrained")
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    kwargs["dtype"] = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model: nn.Module
    try:
        model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {config.model!r}: {exc}") from exc
    tokenizer.padding_side = "left"
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
        model.config.use_cache = False  # type: ignore[union-attr]
    if config.lora.r:
        model = add_lora(model, config.lora)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()  # type: ignore[operator]
    return model, tokenizer


def add_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """``model`` as a peft ``PeftModel`` with a fresh LoRA adapter (only the adapter trains)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    settings = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, settings)
    except ValueError as exc:
        raise ConfigError(f"cannot add LoRA with target_modules={lora.target_modules!r}: {exc}") from exc


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) carries peft adapters that ``adapters_disabled`` can switch off."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` computes its base model's outputs (peft adapters off); the reference policy of a
    LoRA run."""
    if not is_peft_model(model):
        raise ConfigError(f"{type(model).__name__} has no peft adapters to disable")
    with model.disable_adapter():  # type: ignore[operator]
        yield


def save_final(model: nn.Module, tokenizer: Any, folder: str | Path, *, merged: bool = True) -> Path:
    """Write ``model`` and ``tokenizer`` to ``folder`` for ``from_pretrained``: a LoRA model merged into its
    base (``merged``; the in-memory model is then the merged one) or as its adapter alone. Files already in
    ``folder`` that a save does not write stay."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model) and merged:
        model = model.merge_and_unload()  # type: ignore[operator]
    model.save_pretrained(out)  # type: ignore[operator]
    tokenizer.save_pretrained(out)
    return out


__all__ = [
    "DTYPES",
    "SAVE_MODES",
    "LoraConfig",
    "ModelConfig",
    "adapters_disabled",
    "add_lora",
    "is_peft_model",
    "load_causal_lm",
    "save_final",
]
