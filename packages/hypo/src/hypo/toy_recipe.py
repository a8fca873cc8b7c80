"""Recipe ``hypo-toy``: DPO versus HyPO from the same seeds on a synthetic preference task.

The reference policy is a tiny Llama given a short supervised warm-up on toy 2-digit addition (it is
right part of the time). The reward of a completion is exact-match correctness. Offline coverage is
deliberately narrow: ``offline_prompts`` distinct training prompts, each with one pair (chosen = the
correct answer, rejected = a wrong answer sampled from the reference). Both methods start from the
same warmed-up model and reference; the report compares the learned policies' sampled reward and
sequence reverse KL(π ‖ π_ref) on held-out prompts over training.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hypo.config import HyPOConfig
from klcore.config import to_dict
from klcore.data import padding_id
from klcore.errors import ConfigError


def _default_trainer() -> HyPOConfig:
    return HyPOConfig(
        steps=200, lr=1e-4, beta=0.1, kl_coef=0.5, pairs_per_step=32, group_size=4, eval_every=10, eval_samples=4
    )


@dataclass
class HyPOToyConfig:
    """Task, model, warm-up and data of the recipe; ``trainer`` is shared by both runs except ``kl_coef``
    (0 for DPO, ``trainer.kl_coef`` for HyPO). ``seeds``: one DPO and one HyPO run per seed (each seed
    warms up its own reference). ``threads``: torch CPU threads (1 by default: the tiny model gains
    little from more, and on a shared CPU extra threads spin; 0 keeps torch's default)."""

    task: str = "addition"
    task_options: dict[str, int] = field(default_factory=lambda: {"digits": 2})
    model_size: str = "small"
    warmup_steps: int = 800
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    offline_prompts: int = 64
    reference_samples: int = 8
    eval_prompts: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    threads: int = 1
    trainer: HyPOConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_batch_size < 1 or self.threads < 0:
            raise ConfigError("need warmup_steps >= 0, warmup_batch_size >= 1 and threads >= 0")
        for name in ("offline_prompts", "reference_samples", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of ints >= 0, got {self.seeds!r}")
        if self.trainer.kl_coef <= 0:
            raise ConfigError("trainer.kl_coef is HyPO's lambda and must be > 0 (the DPO run uses 0)")
        if self.offline_prompts < self.trainer.pairs_per_step:
            raise ConfigError(
                f"offline_prompts = {self.offline_prompts} < trainer.pairs_per_step = {self.trainer.pairs_per_step}"
            )


def _offline_pairs(model: Any, tok: Any, task: Any, cfg: HyPOToyConfig, seed: int) -> list[Any]:
    """One pair per distinct training prompt: the correct answer over a wrong reference sample."""
    from hypo.data import PreferencePair
    from klcore.rollout import sample
    from klcore.toy import encode_prompts

    gen = torch.Generator().manual_seed(seed + 7)
    problems: list[Any] = []
    seen: set[str] = set()
    while len(problems) < cfg.offline_prompts:
        for p in task.problems(cfg.offline_prompts, generator=gen, split="train"):
            if p.prompt not in seen and len(problems) < cfg.offline_prompts:
                seen.add(p.prompt)
                problems.append(p)
    k = cfg.reference_samples
    roll = sample(
        model, encode_prompts(tok, problems), group_size=k, max_new_tokens=task.max_answer_chars + 2,
        eos_token_id=tok.eos_token_id, pad_token_id=padding_id(tok), generator=gen,
    )
    texts = tok.batch_decode(roll.responses, skip_special_tokens=True)
    pairs = []
    for i, p in enumerate(problems):
        wrong = [t for t in texts[i * k : (i + 1) * k] if t.strip() and not task.verify(p, t)]
        # fall back to a fixed corruption when every reference sample was right (or empty)
        rejected = wrong[0] if wrong else str(int(p.answer) + 1)
        pairs.append(PreferencePair(p.prompt, p.answer, rejected))
    return pairs


def _run_one(
    name: str, model: Any, ref: Any, tok: Any, task: Any, data: Any, eval_ids: list[list[int]], trainer_cfg: HyPOConfig,
    run_dir: Path, cache: Path,
) -> list[dict[str, float]]:
    from hypo import plugin
    from hypo.trainer import HyPOTrainer
    from klcore.plugins import build_plugin_manager

    by_prompt = {}

    def reward(prompt: str, completion: str) -> float:
        if prompt not in by_prompt:
            by_prompt[prompt] = _problem(prompt)
        return task.verify(by_prompt[prompt], completion)  # type: ignore[no-any-return]

    plugins = build_plugin_manager(plugins=[("hypo", plugin)], load_entrypoints=False)
    cfg = copy.deepcopy(trainer_cfg)
    cfg.ref_cache = str(cache)
    trainer = HyPOTrainer(
        model, tok, data, cfg, run_dir=run_dir / name, ref_model=ref, eval_prompts=eval_ids, reward_fn=reward,
        plugins=plugins,
    )
    return trainer.train()


def _problem(prompt: str) -> Any:
    """The toy task's problem of an ``a+b=`` / ``a*b=`` prompt (the reward needs the answer)."""
    from klcore.toy import Problem

    body = prompt.rstrip("=")
    op = "+" if "+" in body else "*"
    a, b = (int(x) for x in body.split(op))
    return Problem(prompt, str(a + b if op == "+" else a * b))


def run(config: HyPOToyConfig, run_dir: Path) -> dict[str, Any]:
    """Warm up a reference, build narrow offline pairs, train DPO and HyPO per seed; write the report."""
    from hypo.data import tokenize_pairs
    from hypo.report import write_report
    from klcore.toy import char_tokenizer, encode_prompts, get_task, tiny_causal_lm, tiny_config, warmup

    if config.task not in ("addition", "multiplication"):
        raise ConfigError(f"hypo-toy supports the addition and multiplication tasks, got {config.task!r}")
    if config.threads:
        torch.set_num_threads(config.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    tok = char_tokenizer()
    task = get_task(config.task, **config.task_options)
    results: dict[str, dict[int, list[dict[str, float]]]] = {"dpo": {}, "hypo": {}}
    for seed in config.seeds:
        ref = tiny_causal_lm(tiny_config(config.model_size), seed=seed)
        warmup(
            ref, tok, task, steps=config.warmup_steps, batch_size=config.warmup_batch_size, lr=config.warmup_lr,
            seed=seed, eval_problems=0,
        )
        ref.eval().requires_grad_(False)
        data = tokenize_pairs(_offline_pairs(ref, tok, task, config, seed), tok, max_length=64)
        eval_problems = task.problems(config.eval_prompts, generator=torch.Generator().manual_seed(seed + 11), split="test")
        eval_ids = encode_prompts(tok, eval_problems)
        cache = run_dir / f"seed{seed}" / "ref_logps.safetensors"
        for name, kl_coef in (("dpo", 0.0), ("hypo", config.trainer.kl_coef)):
            cfg = copy.deepcopy(config.trainer)
            cfg.kl_coef, cfg.seed = kl_coef, seed
            policy = copy.deepcopy(ref).train().requires_grad_(True)
            results[name][seed] = _run_one(name, policy, ref, tok, task, data, eval_ids, cfg, run_dir / f"seed{seed}", cache)
    summary = write_report(
        results, run_dir, config=to_dict(config), seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
    )
    (run_dir / "histories.json").write_text(json.dumps({k: {str(s): h for s, h in v.items()} for k, v in results.items()}))
    return summary


__all__ = ["HyPOToyConfig", "run"]
