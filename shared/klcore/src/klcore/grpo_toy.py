"""Recipe ``grpo-toy``: supervised warm-up, then GRPO on the toy addition task (2 CPU cores, < 3 min)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klcore.errors import ConfigError
from klcore.trainer.config import GRPOConfig


def _default_trainer() -> GRPOConfig:
    return GRPOConfig(
        steps=300, lr=1e-4, prompts_per_step=32, group_size=8, mini_batches=2, eval_every=100, eval_problems=128
    )


@dataclass
class GRPOToyConfig:
    """Model, warm-up and task of the recipe; ``trainer`` is the GRPO config (``--set trainer.steps=5``)."""

    task: str = "addition"
    task_options: dict[str, int] = field(default_factory=lambda: {"digits": 2})
    ood_task: str = "multiplication"
    ood_task_options: dict[str, int] = field(default_factory=lambda: {"digits": 2})
    model_size: str = "small"
    warmup_steps: int = 600
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    threads: int = 0
    trainer: GRPOConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_batch_size < 1 or self.threads < 0:
            raise ConfigError("need warmup_steps >= 0, warmup_batch_size >= 1 and threads >= 0")


def run(config: GRPOToyConfig, run_dir: Path) -> dict[str, Any]:
    """Warm up a tiny Llama on the task, then train it with GRPO; summary of start/end figures."""
    from klcore.toy import char_tokenizer, get_task, tiny_causal_lm, tiny_config, warmup
    from klcore.trainer.grpo import GRPOTrainer

    if config.threads:
        torch.set_num_threads(config.threads)
    tok = char_tokenizer()
    task = get_task(config.task, **config.task_options)
    eval_tasks = {task.name: task}
    if config.ood_task:
        ood = get_task(config.ood_task, **config.ood_task_options)
        eval_tasks[f"ood_{ood.name}"] = ood
    model = tiny_causal_lm(tiny_config(config.model_size), seed=config.trainer.seed)
    warm = warmup(
        model, tok, task, steps=config.warmup_steps, batch_size=config.warmup_batch_size,
        lr=config.warmup_lr, seed=config.trainer.seed, eval_problems=0,
    )
    trainer = GRPOTrainer(model, tok, task, config.trainer, run_dir=run_dir, eval_tasks=eval_tasks)
    history = trainer.train()
    first, last = history[0], history[-1]
    k = max(1, len(history) // 10)

    def mean(key: str, rows: list[dict[str, float]]) -> float:
        return sum(r[key] for r in rows) / len(rows)

    summary: dict[str, Any] = {
        "warmup_final_loss": warm.losses[-1] if warm.losses else None,
        "steps": len(history),
        "averaged_over_steps": k,
        "reward/mean_start": mean("reward/mean", history[:k]),
        "reward/mean_end": mean("reward/mean", history[-k:]),
        "entropy/mean_start": mean("entropy/mean", history[:k]),
        "entropy/mean_end": mean("entropy/mean", history[-k:]),
        "run_dir": str(run_dir),
    }
    for name in eval_tasks:
        key = f"eval/{name}_accuracy"
        summary[f"{key}_start"], summary[f"{key}_end"] = first.get(key), last.get(f"{key}_final")
    return summary
