"""Recipe ``hypo-toy``: DPO versus HyPO on a synthetic preference task, through ``klcore.experiments``.

Per seed, a tiny Llama given a short supervised warm-up on toy 2-digit addition (right part of the
time) is the reference; it is built once and shared by both variants of that seed. The reward of a
completion is exact-match correctness. Offline coverage is deliberately narrow: ``offline_prompts``
distinct training prompts, each with one pair (chosen = the correct answer, rejected = a wrong answer
sampled from the reference). Variants ``dpo`` (kl_coef 0) and ``hypo`` (kl_coef = ``trainer.kl_coef``)
train a copy of the reference; each is scored on ``eval_prompts`` distinct held-out prompts x
``trainer.eval_samples`` samples (reward and sequence reverse KL(π ‖ π_ref)). ``run_experiment``
aggregates the seeds (95% intervals); the paired difference hypo - dpo per seed gets its own interval.
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
from klcore.data import padding_id
from klcore.errors import ConfigError

#: metrics compared between the variants (final values on the held-out prompts)
COMPARED = ("reward_final", "reverse_kl_final")
FIGURES = ["eval/reward", "eval/reverse_kl", "rewards/accuracy", "dpo/loss"]


def _default_trainer() -> HyPOConfig:
    return HyPOConfig(
        steps=200, lr=1e-4, beta=0.1, kl_coef=0.5, pairs_per_step=32, group_size=4, eval_every=50, eval_samples=4
    )


@dataclass
class HyPOToyConfig:
    """Task, model, warm-up, data and evaluation of the experiment; ``trainer`` is shared by both variants
    except ``kl_coef`` (0 for DPO, ``trainer.kl_coef`` for HyPO). ``seeds``: one reference per seed and
    one DPO and one HyPO run from it. ``eval_prompts``: distinct held-out prompts, each sampled
    ``trainer.eval_samples`` times at temperature 1. ``threads``: torch CPU threads (0 keeps torch's)."""

    task: str = "addition"
    task_options: dict[str, int] = field(default_factory=lambda: {"digits": 2})
    model_size: str = "small"
    warmup_steps: int = 800
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    offline_prompts: int = 64
    reference_samples: int = 8
    eval_prompts: int = 512
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    threads: int = 1
    trainer: HyPOConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_batch_size < 1 or self.threads < 0:
            raise ConfigError("need warmup_steps >= 0, warmup_batch_size >= 1 and threads >= 0")
        for name in ("offline_prompts", "reference_samples", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of ints >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds!r}")
        if self.trainer.kl_coef <= 0:
            raise ConfigError("trainer.kl_coef is HyPO's lambda and must be > 0 (the DPO run uses 0)")
        if self.offline_prompts < self.trainer.pairs_per_step:
            raise ConfigError(
                f"offline_prompts = {self.offline_prompts} < trainer.pairs_per_step = {self.trainer.pairs_per_step}"
            )
        if self.task not in ("addition", "multiplication"):
            raise ConfigError(f"hypo-toy supports the addition and multiplication tasks, got {self.task!r}")


def distinct_problems(task: Any, n: int, *, split: str, seed: int) -> list[Any]:
    """``n`` problems of ``split`` with distinct prompts, drawn from ``seed``; refuses a split too small."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for _ in range(1000):
        for p in task.problems(n, generator=gen, split=split):
            out.setdefault(p.prompt, p)
        if len(out) >= n:
            return list(out.values())[:n]
    raise ConfigError(f"found only {len(out)} distinct {split} problems of {task.name}; ask for fewer than {n}")


def _offline_pairs(model: Any, tok: Any, task: Any, cfg: HyPOToyConfig, seed: int) -> list[Any]:
    """One pair per distinct training prompt: the correct answer over a wrong reference sample."""
    from hypo.data import PreferencePair
    from klcore.rollout import sample
    from klcore.toy import encode_prompts

    problems = distinct_problems(task, cfg.offline_prompts, split="train", seed=seed + 7)
    k = cfg.reference_samples
    roll = sample(
        model, encode_prompts(tok, problems), group_size=k, max_new_tokens=task.max_answer_chars + 2,
        eos_token_id=tok.eos_token_id, pad_token_id=padding_id(tok), generator=torch.Generator().manual_seed(seed + 8),
    )
    texts = tok.batch_decode(roll.responses, skip_special_tokens=True)
    pairs = []
    for i, p in enumerate(problems):
        wrong = [t for t in texts[i * k : (i + 1) * k] if t.strip() and not task.verify(p, t)]
        # fall back to a fixed corruption when every reference sample was right (or empty)
        rejected = wrong[0] if wrong else str(int(p.answer) + 1)
        pairs.append(PreferencePair(p.prompt, p.answer, rejected))
    return pairs


def _problem(prompt: str) -> Any:
    """The toy task's problem of an ``a+b=`` / ``a*b=`` prompt (the reward needs the answer)."""
    from klcore.toy import Problem

    body = prompt.rstrip("=")
    op = "+" if "+" in body else "*"
    a, b = (int(x) for x in body.split(op))
    return Problem(prompt, str(a + b if op == "+" else a * b))


@dataclass
class _Seed:
    """What both variants of one seed share: the frozen reference and its offline pairs."""

    reference: Any
    data: Any
    reference_accuracy: float


class _Setting:
    """The experiment's shared pieces; references are warmed up on first use and saved for a resume."""

    def __init__(self, config: HyPOToyConfig, run_dir: Path) -> None:
        from klcore.toy import char_tokenizer, encode_prompts, get_task

        self.config, self.run_dir = config, run_dir
        self.tok = char_tokenizer()
        self.task = get_task(config.task, **config.task_options)
        self.held_out = distinct_problems(self.task, config.eval_prompts, split="test", seed=4321)
        self.eval_ids = encode_prompts(self.tok, self.held_out)
        self._seeds: dict[int, _Seed] = {}

    def seed(self, seed: int) -> _Seed:
        from hypo.data import tokenize_pairs
        from klcore.toy import evaluate, tiny_causal_lm, tiny_config, warmup

        if seed in self._seeds:
            return self._seeds[seed]
        cfg = self.config
        ref = tiny_causal_lm(tiny_config(cfg.model_size), seed=seed)
        saved = self.run_dir / "references" / f"seed-{seed}.pt"
        if saved.is_file():
            ref.load_state_dict(torch.load(saved, weights_only=True))
        else:
            warmup(ref, self.tok, self.task, steps=cfg.warmup_steps, batch_size=cfg.warmup_batch_size,
                   lr=cfg.warmup_lr, seed=seed, eval_problems=0)
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ref.state_dict(), saved)
        ref.eval().requires_grad_(False)
        data = tokenize_pairs(_offline_pairs(ref, self.tok, self.task, cfg, seed), self.tok, max_length=64)
        accuracy = evaluate(ref, self.tok, self.task, n=len(self.held_out), seed=4321)
        self._seeds[seed] = _Seed(ref, data, accuracy)
        return self._seeds[seed]

    def reward(self, prompt: str, completion: str) -> float:
        return self.task.verify(_problem(prompt), completion)  # type: ignore[no-any-return]


def _run_one(setting: _Setting, options: dict[str, Any], seed: int, run_dir: Path) -> dict[str, float]:
    """Train a copy of the seed's reference with ``kl_coef = options["kl_coef"]``; final held-out metrics."""
    from hypo import plugin
    from hypo.trainer import HyPOTrainer
    from klcore.plugins import build_plugin_manager

    shared = setting.seed(seed)
    cfg = copy.deepcopy(setting.config.trainer)
    cfg.kl_coef, cfg.seed = float(options["kl_coef"]), seed
    cfg.ref_cache = str(setting.run_dir / "references" / f"seed-{seed}-ref_logps.safetensors")
    policy = copy.deepcopy(shared.reference).train().requires_grad_(True)
    trainer = HyPOTrainer(
        policy, setting.tok, shared.data, cfg, run_dir=run_dir, ref_model=shared.reference,
        eval_prompts=setting.eval_ids, reward_fn=setting.reward,
        plugins=build_plugin_manager(plugins=[("hypo", plugin)], load_entrypoints=False),
    )
    history = trainer.train()
    first, last = history[0], history[-1]
    return {
        "reward_start": first["eval/reward"],
        "reward_final": last["eval/reward_final"],
        "reverse_kl_final": last["eval/reverse_kl_final"],
        "reverse_kl_max": max(r[k] for r in history for k in ("eval/reverse_kl", "eval/reverse_kl_final") if k in r),
        "length_mean_final": last["eval/length_mean_final"],
        "train_pair_accuracy_last": last["rewards/accuracy"],
        "dpo_loss_last": last["dpo/loss"],
        "reference_greedy_pass@1": shared.reference_accuracy,
    }


def paired_differences(runs: dict[tuple[str, int], dict[str, float]], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per compared metric: hypo - dpo per seed (same reference, same held-out prompts), with its interval."""
    from klcore.experiments import mean_interval

    out = {}
    for metric in COMPARED:
        diffs = [runs["hypo", s][metric] - runs["dpo", s][metric] for s in seeds]
        ci = mean_interval(diffs)
        out[metric] = {"mean": ci.mean, "ci_low": _finite(ci.low), "ci_high": _finite(ci.high), "values": diffs}
    return out


def _finite(x: float) -> float | None:
    """``x``, or None where it is NaN (one seed has no interval), so the summary stays strict JSON."""
    return None if x != x else x


def _difference_table(diffs: dict[str, dict[str, Any]]) -> str:
    lines = ["| metric | hypo - dpo (mean) | 95% interval | per seed |", "|---|---|---|---|"]
    for metric, d in diffs.items():
        interval = "-" if d["ci_low"] is None else f"[{d['ci_low']:.4f}, {d['ci_high']:.4f}]"
        lines.append(f"| {metric} | {d['mean']:.4f} | {interval} | {', '.join(f'{v:.4f}' for v in d['values'])} |")
    return "\n".join(lines)


def run(config: HyPOToyConfig, run_dir: Path) -> dict[str, Any]:
    """Every variant x seed through ``klcore.experiments.run_experiment`` (resumable); the experiment's
    ``report.md`` gets the paired hypo - dpo differences appended; returns the summary it writes."""
    from klcore.experiments import run_experiment

    if config.threads:
        torch.set_num_threads(config.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    run_dir = Path(run_dir)
    setting = _Setting(config, run_dir)
    t = config.trainer
    result = run_experiment(
        lambda _variant, options, seed, folder: _run_one(setting, options, seed, folder),
        {"dpo": {"kl_coef": 0.0}, "hypo": {"kl_coef": t.kl_coef}}, config.seeds, run_dir / "experiment",
        title=f"hypo-toy: DPO vs HyPO (lambda {t.kl_coef}) on {config.task} {config.task_options}, "
              f"{config.offline_prompts} offline pairs, {len(setting.held_out)} held-out prompts x {t.eval_samples} "
              "samples",
        figure_metrics=FIGURES,
    )
    diffs = paired_differences(result.runs, config.seeds)
    report = result.out / "report.md"
    report.write_text(report.read_text() + "\n## Paired differences (same reference and prompts per seed)\n\n"
                      + _difference_table(diffs) + "\n")
    summary = {"experiment": result.summary, "paired_differences": diffs, "report": str(report),
               "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


__all__ = ["COMPARED", "HyPOToyConfig", "distinct_problems", "paired_differences", "run"]
