"""Embedded defaults that let every LM recipe and test run offline on a CPU in seconds.

A character tokenizer built in code, tiny Llama-style (and MoE) configs with random init, small
verifiable tasks with exact-match verifiers, and a short supervised warm-up. Needs ``klcore[lm]``.
"""

from klcore.toy.models import MODEL_SIZES, tiny_causal_lm, tiny_config, tiny_moe_config
from klcore.toy.tasks import TASKS, AdditionTask, MultiplicationTask, Problem, SortingTask, Task, get_task
from klcore.toy.tokenizer import CHARACTERS, char_tokenizer
from klcore.toy.warmup import WarmupResult, encode_prompts, evaluate, warmup

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
