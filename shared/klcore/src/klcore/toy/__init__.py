"""Embedded defaults that let every LM recipe and test run offline on a CPU in seconds.

A character tokenizer built in code, tiny Llama-style (and MoE) configs with random init, small
verifiable tasks with exact-match verifiers, and a short supervised warm-up. The tasks need only torch;
the models and the tokenizer need ``klcore[lm]`` and are imported on first use, so ``klcore.toy.tasks`` (and
``klcore.data``, which builds on it) load without transformers.
"""

from typing import TYPE_CHECKING, Any

from klcore.toy.tasks import TASKS, AdditionTask, MultiplicationTask, Problem, SortingTask, Task, get_task
from klcore.toy.warmup import WarmupResult, encode_prompts, evaluate, warmup

if TYPE_CHECKING:
    from klcore.toy.models import MODEL_SIZES, tiny_causal_lm, tiny_config, tiny_moe_config
    from klcore.toy.tokenizer import CHARACTERS, char_tokenizer

_LAZY = {
    "MODEL_SIZES": "models", "tiny_causal_lm": "models", "tiny_config": "models", "tiny_moe_config": "models",
    "CHARACTERS": "tokenizer", "char_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"klcore.toy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'klcore.toy' has no attribute {name!r}")


__all__ = [
    "CHARACTERS",
    "MODEL_SIZES",
    "TASKS",
    "AdditionTask",
    "MultiplicationTask",
    "Problem",
    "SortingTask",
    "Task",
    "WarmupResult",
    "char_tokenizer",
    "encode_prompts",
    "evaluate",
    "get_task",
    "tiny_causal_lm",
    "tiny_config",
    "tiny_moe_config",
    "warmup",
]
