"""Recipes ``grpo`` (train any causal LM on a prompt dataset) and ``evaluate`` (pass@k of a model on one).

Both read the model keys of :class:`klcore.models.ModelConfig` (``model``, ``dtype``, ``lora.r``, ...),
the prompts from ``data`` (a file or ``datasets`` name, :class:`klcore.data.DataConfig`) or from a
registered ``task`` (``task_options``), and score with a registered ``reward`` (``reward_options``;
empty: the task's own verifier, ``exact_match`` for a data file)::

    klcore run grpo --set model=Qwen/Qwen2.5-0.5B-Instruct --set data.path=train.jsonl \\
        --set reward=math_verify --set lora.r=16 --set trainer.steps=200 --out runs/qwen
    klcore run evaluate --set model=runs/qwen/final --set data.path=test.jsonl --set reward=math_verify
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klcore.data import DataConfig, PromptDataset, encode_prompt, load_prompts, padding_id, score_completions
from klcore.errors import ConfigError, DataError
from klcore.models import SAVE_MODES, ModelConfig, load_causal_lm, save_final
from klcore.plugins import Plugins, build_plugin_manager
from klcore.rollout import pass_at_k, sample
from klcore.trainer.config import GRPOConfig

EVAL_SPLITS = ("test", "train", "all")


@dataclass
class PromptSource(ModelConfig):
    """A model and the prompts and reward it is trained or scored on."""

    data: DataConfig = field(default_factory=DataConfig)
    task: str = ""
    task_options: dict[str, Any] = field(default_factory=dict)
    reward: str = ""
    reward_options: dict[str, Any] = field(default_factory=dict)


def build_task(plugins: Plugins, source: PromptSource, tokenizer: Any) -> Any:
    """The task ``source`` names (a registered task, else ``load_prompts(source.data)``) with its reward."""
    if not source.task and not source.data.path:
        raise ConfigError("name the prompts: --set data.path=FILE_OR_DATASET, or a registered --set task=NAME")
    reward = None
    if source.reward:
        factory = plugins.registry("reward").get_component(source.reward)
        try:
            reward = factory(**source.reward_options)
        except TypeError as exc:
            raise ConfigError(f"cannot build reward {source.reward!r} with {source.reward_options}: {exc}") from exc
    if source.task:
        factory = plugins.registry("task").get_component(source.task)
        try:
            task = factory(tokenizer=tokenizer, data=source.data, **source.task_options)
        except TypeError as exc:
            raise ConfigError(f"cannot build task {source.task!r} with {source.task_options}: {exc}") from exc
        if reward is not None:
            if not isinstance(task, PromptDataset):
                raise ConfigError(f"task {source.task!r} scores with its own verifier; leave reward empty")
            task.reward = reward
        return task
    if reward is None:
        reward = plugins.registry("reward").get_component("exact_match")()
    return load_prompts(source.data, tokenizer, reward=reward)


def _default_trainer() -> GRPOConfig:
    return GRPOConfig(steps=100, lr=1e-5, prompts_per_step=8, group_size=8, max_new_tokens=256, eval_problems=64)


@dataclass
class GRPORecipeConfig(PromptSource):
    """``klcore run grpo``: the model and prompts, ``trainer`` (any registered ``trainer.loss``,
    ``trainer.regularisers``, ``trainer.metrics``), and how the final model is saved to ``OUT/final/``
    (``save``: ``merged``, ``adapter`` or ``none``)."""

    save: str = "merged"
    trainer: GRPOConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.save not in SAVE_MODES:
            raise ConfigError(f"save must be one of {SAVE_MODES}, got {self.save!r}")


def run_grpo(config: GRPORecipeConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``config.model`` with GRPO on the prompts; save it to ``run_dir/final``; start/end figures."""
    from klcore.trainer.grpo import GRPOTrainer

    plugins = build_plugin_manager()
    torch.manual_seed(config.trainer.seed)  # a LoRA adapter's initialisation
    model, tokenizer = load_causal_lm(config)
    task = build_task(plugins, config, tokenizer)
    has_test = bool(task.items("test")) if hasattr(task, "items") else True
    eval_tasks = {task.name: task} if has_test else {}
    trainer = GRPOTrainer(model, tokenizer, task, config.trainer, run_dir=run_dir, eval_tasks=eval_tasks,
                          plugins=plugins)
    history = trainer.train()
    final = None
    if config.save != "none":
        if trainer.accelerator.is_main_process:
            final = str(save_final(trainer.unwrapped_model, tokenizer, run_dir / "final", merged=config.save == "merged"))
        trainer.accelerator.wait_for_everyone()
    k = max(1, len(history) // 10)

    def mean(key: str, rows: list[dict[str, float]]) -> float | None:
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else None

    summary: dict[str, Any] = {
        "steps": len(history), "averaged_over_steps": k, "final": final,
        "reward/mean_start": mean("reward/mean", history[:k]), "reward/mean_end": mean("reward/mean", history[-k:]),
        **{key: history[-1][key] for key in history[-1] if key.startswith("data/")},
    }
    for name in eval_tasks:
        key = f"eval/{name}_accuracy"
        summary[f"{key}_start"], summary[f"{key}_end"] = history[0].get(key), history[-1].get(f"{key}_final")
    return summary


@dataclass
class EvaluateConfig(PromptSource):
    """``klcore run evaluate``: pass@k for each ``ks`` from ``samples`` completions per prompt (greedy when
    ``samples = 1`` and ``temperature = 0``) on ``split`` (``test``, ``train`` or ``all``); a completion
    counts as correct when its reward is at least ``threshold``. ``max_prompts = 0``: every prompt."""

    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [1, 4])
    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_prompts: int = 0
    prompts_per_batch: int = 8
    threshold: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in EVAL_SPLITS:
            raise ConfigError(f"split must be one of {EVAL_SPLITS}, got {self.split!r}")
        for name in ("samples", "max_new_tokens", "prompts_per_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.samples
                              for k in self.ks):
            raise ConfigError(f"ks must be ints in 1..samples = {self.samples}, got {self.ks!r}")
        if self.temperature < 0 or (self.temperature == 0 and self.samples > 1):
            raise ConfigError("temperature must be > 0 (or 0, greedy, with samples = 1)")


@torch.no_grad()
def pass_at_k_report(model: torch.nn.Module, tokenizer: Any, task: Any, config: EvaluateConfig) -> dict[str, Any]:
    """Unbiased pass@k per prompt, averaged over the prompts with a 95% Student-t interval, and the mean
    reward; every prompt of the split counted once."""
    from klcore.experiments import mean_interval

    if not hasattr(task, "items"):
        raise ConfigError("evaluate needs a dataset task (one listing its prompts); toy tasks draw theirs")
    prompts = task.items("train") + task.items("test") if config.split == "all" else task.items(config.split)
    prompts = prompts[: config.max_prompts] if config.max_prompts else prompts
    if not prompts:
        raise DataError(f"the {config.split!r} split holds no prompt; use split='all' or lower data.test_fraction")
    gen = torch.Generator().manual_seed(config.seed)
    n, per_prompt, rewards = config.samples, {k: [] for k in config.ks}, []  # type: ignore[var-annotated]
    for start in range(0, len(prompts), config.prompts_per_batch):
        chunk = prompts[start : start + config.prompts_per_batch]
        roll = sample(model, [encode_prompt(tokenizer, p) for p in chunk], group_size=n,
                      max_new_tokens=config.max_new_tokens,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=padding_id(tokenizer),
                      temperature=config.temperature or 1.0, top_p=config.top_p, greedy=config.temperature == 0,
                      generator=gen)
        texts = tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
        scores = score_completions(task, [chunk[i // n] for i in range(len(texts))], texts)
        rewards += scores
        for p in range(len(chunk)):
            correct = sum(s >= config.threshold for s in scores[p * n : (p + 1) * n])
            for k in config.ks:
                per_prompt[k].append(pass_at_k(n, correct, k))
    report: dict[str, Any] = {"prompts": len(prompts), "samples": n, "split": config.split}
    for name, values in [*((f"pass@{k}", v) for k, v in per_prompt.items()), ("reward/mean", rewards)]:
        ci = mean_interval(values)
        report[name] = {"mean": ci.mean, "ci_low": _finite(ci.low), "ci_high": _finite(ci.high), "n": ci.n}
    return report


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_evaluate(config: EvaluateConfig, run_dir: Path) -> dict[str, Any]:
    """Score ``config.model`` on the prompts (see ``pass_at_k_report``); written to ``summary.json``."""
    plugins = build_plugin_manager()
    model, tokenizer = load_causal_lm(dataclasses.replace(config, lora=dataclasses.replace(config.lora, r=0)))
    task = build_task(plugins, config, tokenizer)
    return {"model": config.model, **pass_at_k_report(model.eval(), tokenizer, task, config)}


__all__ = [
    "EVAL_SPLITS",
    "EvaluateConfig",
    "GRPORecipeConfig",
    "PromptSource",
    "build_task",
    "pass_at_k_report",
    "run_evaluate",
    "run_grpo",
]
