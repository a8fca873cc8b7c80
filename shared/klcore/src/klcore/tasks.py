"""Built-in tasks: the toy families and ``reasoning_gym``.

A task is built by a factory registered through ``klcore_register_tasks``, called as
``factory(tokenizer=..., data=DataConfig, **options)``; it returns an object with ``problems(n,
generator=, split=)`` and ``verify(problem, completion)`` (``score(problems, completions)`` optional,
for a batch), like ``klcore.toy.Task`` and ``klcore.data.PromptDataset``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from klcore.data import DataConfig, PromptDataset, prompts_from_rows
from klcore.errors import ConfigError
from klcore.rewards import reasoning_gym as reasoning_gym_reward
from klcore.toy.tasks import TASKS, Task, get_task


def toy_task(name: str) -> Callable[..., Task]:
    """The factory of toy family ``name`` (``digits=`` / ``length=`` options); tokenizer and data unused."""

    def factory(tokenizer: Any = None, data: DataConfig | None = None, **options: int) -> Task:
        return get_task(name, **options)

    return factory


def reasoning_gym_task(tokenizer: Any = None, data: DataConfig | None = None, *, dataset: str = "", size: int = 500,
                       seed: int = 0, **dataset_options: Any) -> PromptDataset:
    """``size`` items of the ``reasoning_gym`` dataset ``dataset`` generated offline from ``seed`` (its own
    options passed through), as prompts (``question``) scored by the dataset's ``score_answer``; split,
    chat template and length limit from ``data``. Needs ``klcore[reasoning-gym]``."""
    try:
        import reasoning_gym as rg
    except ImportError as exc:
        raise ConfigError("task 'reasoning_gym' needs reasoning-gym: pip install 'klcore[reasoning-gym]'") from exc
    if not dataset:
        raise ConfigError("task 'reasoning_gym' needs the dataset option, e.g. task_options = {dataset = 'leg_counting'}")
    if tokenizer is None:
        raise ConfigError("task 'reasoning_gym' needs the tokenizer to encode its prompts")
    try:
        items = rg.create_dataset(dataset, size=size, seed=seed, **dataset_options)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"reasoning_gym cannot build {dataset!r} with {dataset_options}: {exc}") from exc
    base = data or DataConfig()
    config = dataclasses.replace(base, path="", prompt_field="question", answer_field="answer", messages_field="")
    rows = [(f"{dataset}:{i}", dict(items[i])) for i in range(len(items))]
    return prompts_from_rows(rows, config, tokenizer, reward=reasoning_gym_reward(dataset=dataset), name=dataset)


BUILTIN_TASKS: dict[str, tuple[Callable[..., Any], str]] = {
    **{name: (toy_task(name), f"toy {name} with an exact-match verifier") for name in TASKS},
    "reasoning_gym": (reasoning_gym_task, "any reasoning_gym dataset, generated offline [klcore[reasoning-gym]]"),
}

__all__ = ["BUILTIN_TASKS", "reasoning_gym_task", "toy_task"]
