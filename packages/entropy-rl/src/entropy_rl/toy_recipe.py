"""Recipe ``entropy-toy``: GRPO (PPO-clip), Clip-Cov and KL-Cov from one warm-up checkpoint, same seeds.

Each method trains a copy of the same warmed-up tiny Llama on klcore's toy task with several
optimiser steps per rollout (``trainer.mini_batches``), the entropy-dynamics probe enabled. One
report (``report.md`` + ``report.png``): entropy and reward curves, predicted versus measured
entropy change, the entropy-performance law fitted per method.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entropy_rl import _plots
from entropy_rl.law import fit_entropy_law
from klcore.errors import ConfigError, DataError
from klcore.trainer.config import GRPOConfig

METHODS = {"grpo": "vanilla", "clip_cov": "clip_cov", "kl_cov": "kl_cov"}


def _default_trainer() -> GRPOConfig:
    return GRPOConfig(
        steps=100, lr=1e-4, prompts_per_step=16, group_size=8, mini_batches=4, eval_every=0, eval_problems=128,
    )


@dataclass
class EntropyToyConfig:
    """``methods``: which of ``grpo``, ``clip_cov``, ``kl_cov`` to run; ``<method>_options``: their loss options.

    The toy mini-batches hold ~150 response tokens, so the recipe's default fractions are larger than
    the paper's (2e-4 / 2e-3 would select one token per mini-batch); ``--set clip_cov_options.ratio=2e-4``
    restores them. ``probe_states``: states per step whose full distribution the probe keeps.
    """

    task: str = "addition"
    task_options: dict[str, int] = field(default_factory=lambda: {"digits": 2})
    model_size: str = "small"
    warmup_steps: int = 600
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    threads: int = 0
    methods: list[str] = field(default_factory=lambda: ["grpo", "clip_cov", "kl_cov"])
    grpo_options: dict[str, Any] = field(default_factory=lambda: {"clip_low": 0.2, "clip_high": 0.2})
    clip_cov_options: dict[str, Any] = field(
        default_factory=lambda: {"ratio": 0.02, "cov_bounds": [1.0, 5.0], "clip": [1.0, 1.0]}
    )
    kl_cov_options: dict[str, Any] = field(default_factory=lambda: {"ratio": 0.02, "beta": 1.0})
    probe_states: int = 512
    trainer: GRPOConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_batch_size < 1 or self.threads < 0 or self.probe_states < 1:
            raise ConfigError("need warmup_steps >= 0, warmup_batch_size >= 1, threads >= 0 and probe_states >= 1")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct names from {sorted(METHODS)}, got {self.methods!r}")
        if self.trainer.mini_batches < 2:
            raise ConfigError(
                f"trainer.mini_batches = {self.trainer.mini_batches}: use >= 2 updates per rollout "
                "(KL-Cov's penalty is inactive on the first, on-policy mini-batch)"
            )


def _mean(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def run(config: EntropyToyConfig, run_dir: Path) -> dict[str, Any]:
    """Warm up once, train every method from that checkpoint, write the report; per-method summary."""
    from safetensors.torch import save_file

    from klcore.plugins import build_plugin_manager
    from klcore.toy import char_tokenizer, get_task, tiny_causal_lm, tiny_config, warmup
    from klcore.trainer.grpo import GRPOTrainer

    if config.threads:
        torch.set_num_threads(config.threads)
    tok = char_tokenizer()
    task = get_task(config.task, **config.task_options)
    seed = config.trainer.seed
    model = tiny_causal_lm(tiny_config(config.model_size), seed=seed)
    warm = warmup(
        model, tok, task, steps=config.warmup_steps, batch_size=config.warmup_batch_size, lr=config.warmup_lr,
        seed=seed, eval_problems=0,
    )
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / ".warmup.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(run_dir / "warmup.safetensors")

    histories: dict[str, list[dict[str, float]]] = {}
    for method in config.methods:
        policy = tiny_causal_lm(tiny_config(config.model_size), seed=seed)
        policy.load_state_dict(state)
        trainer_cfg = copy.deepcopy(config.trainer)
        trainer_cfg.loss = METHODS[method]
        trainer_cfg.loss_options = dict(getattr(config, f"{method}_options"))
        trainer_cfg.metrics = {**trainer_cfg.metrics, "entropy_dynamics": {"max_states": config.probe_states}}
        trainer = GRPOTrainer(
            policy, tok, task, trainer_cfg, run_dir=run_dir / method, eval_tasks={task.name: task},
            plugins=build_plugin_manager(),  # a fresh manager per run: each enables its own probe
        )
        histories[method] = trainer.train()

    summary: dict[str, Any] = {"warmup_final_loss": warm.losses[-1] if warm.losses else None, "methods": {}}
    fits = {}
    for method, rows in histories.items():
        k = max(1, len(rows) // 10)
        entropy = np.array([r["entropy/mean"] for r in rows])
        reward = np.array([r["reward/mean"] for r in rows])
        try:
            fit = fit_entropy_law(entropy, reward)
        except DataError:
            fit = None
        fits[method] = fit
        pred = np.array([r.get("dynamics/predicted_change", np.nan) for r in rows])
        act = np.array([r.get("dynamics/actual_change", np.nan) for r in rows])
        ok = np.isfinite(pred) & np.isfinite(act)
        summary["methods"][method] = {
            "loss": METHODS[method],
            "averaged_over_steps": k,
            "entropy_start": _mean(rows[:k], "entropy/mean"),
            "entropy_end": _mean(rows[-k:], "entropy/mean"),
            "reward_start": _mean(rows[:k], "reward/mean"),
            "reward_end": _mean(rows[-k:], "reward/mean"),
            "eval_accuracy_start": rows[0].get(f"eval/{task.name}_accuracy"),
            "eval_accuracy_end": rows[-1].get(f"eval/{task.name}_accuracy_final"),
            "selected_frac": _mean(rows, "cov/selected_frac"),
            "cov_token_mean": _mean(rows, "dynamics/cov_token"),
            "predicted_vs_measured_corr": float(np.corrcoef(pred[ok], act[ok])[0, 1]) if ok.sum() > 2 else None,
            "law": None if fit is None else {"a": fit.a, "b": fit.b, "r2": fit.r2, "ceiling": fit.ceiling if fit.holds() else None},
            "run_dir": str(run_dir / method),
        }
    _plots.toy_report_plot(run_dir / "report.png", histories, fits)
    (run_dir / "report.md").write_text(_report(config, summary))
    summary["report"] = str(run_dir / "report.md")
    return summary


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _report(config: EntropyToyConfig, summary: dict[str, Any]) -> str:
    t = config.trainer
    lines = [
        "# entropy-toy: GRPO vs Clip-Cov vs KL-Cov", "",
        f"Task `{config.task}` {config.task_options}, tiny Llama `{config.model_size}`, warm-up {config.warmup_steps} "
        f"steps, then {t.steps} RL steps of {t.prompts_per_step} prompts x {t.group_size} samples, "
        f"{t.mini_batches} optimiser steps per rollout, lr {t.lr}, seed {t.seed}; every method starts from the same "
        "checkpoint (`warmup.safetensors`).", "",
        f"Loss options: grpo {config.grpo_options}; clip_cov {config.clip_cov_options}; kl_cov {config.kl_cov_options}.",
        "Start / end values are means over the first / last 10% of steps.", "",
        "| method | entropy start | entropy end | reward start | reward end | eval acc. start | eval acc. end "
        "| selected frac. | law a | law b | law R² | ceiling b-a | corr(pred, meas. ΔH) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        law = m["law"] or {}
        lines.append(
            f"| {name} | {_fmt(m['entropy_start'])} | {_fmt(m['entropy_end'])} | {_fmt(m['reward_start'])} "
            f"| {_fmt(m['reward_end'])} | {_fmt(m['eval_accuracy_start'])} | {_fmt(m['eval_accuracy_end'])} "
            f"| {_fmt(m['selected_frac'], '.4f')} | {_fmt(law.get('a'), '.3g')} | {_fmt(law.get('b'), '.3g')} "
            f"| {_fmt(law.get('r2'), '.2f')} | {_fmt(law.get('ceiling'), '.3g')} "
            f"| {_fmt(m['predicted_vs_measured_corr'], '.2f')} |"
        )
    lines += [
        "", "KL-Cov's penalty is inactive on the first (on-policy) mini-batch of each rollout: |log ratio| = 0 there "
        "and its gradient at 0 is 0.", "", "![report](report.png)", "",
    ]
    return "\n".join(lines)
