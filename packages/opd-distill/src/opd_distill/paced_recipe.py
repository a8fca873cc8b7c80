"""Recipe ``paced-toy``: PACED on toy addition with a stronger teacher and a smaller student.

The teacher (klcore's ``small`` toy Llama) and the student (a narrower Llama) are both warmed up with
``klcore.toy.warmup``, the teacher for longer. From the same initial student, each variant runs the
on-policy distillation loop: unweighted forward KL, hard-filter forward KL, PACED forward KL, and
PACED forward KL then PACED reverse KL. The report gives greedy pass@1 on held-out problems.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klcore.errors import ConfigError
from opd_distill._report import curve, markdown_table, plot_curves
from opd_distill.config import DistillConfig
from opd_distill.paced import PacedConfig

#: variant -> (weighting, first objective, second objective after the switch or "")
VARIANTS: dict[str, tuple[str, str, str]] = {
    "fkl": ("none", "full_forward_kl", ""),
    "hard_filter_fkl": ("hard_filter", "full_forward_kl", ""),
    "paced_fkl": ("paced", "full_forward_kl", ""),
    "paced_fkl_then_rkl": ("paced", "full_forward_kl", "full_reverse_kl"),
    "rkl": ("none", "full_reverse_kl", ""),
    "paced_rkl": ("paced", "full_reverse_kl", ""),
    "opd": ("none", "opd_reinforce", ""),
}


def _default_trainer() -> DistillConfig:
    return DistillConfig(
        steps=120,
        lr=1e-3,
        prompts_per_step=32,
        group_size=4,
        problem_pool=256,
        eval_every=30,
        eval_problems=256,
        paced=PacedConfig(samples=8, every=30),
    )


@dataclass
class PacedToyConfig:
    """Task, models, warm-ups and variants. ``switch_step = 0`` switches FKL -> RKL at half the steps.
    ``fkl_samples``: ``teacher`` trains the forward-KL stage on teacher-written completions (PACED v1's
    reference responses), ``student`` on the student's own. Reverse-KL stages always use the student's.
    ``trainer.paced`` holds K, the re-estimation period, alpha, beta and the normalisation flag."""

    task: str = "addition"
    task_options: dict[str, int] = field(default_factory=lambda: {"digits": 2})
    teacher_size: str = "small"
    teacher_warmup_steps: int = 1200
    student_hidden: int = 64
    student_layers: int = 2
    student_warmup_steps: int = 300
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    variants: list[str] = field(default_factory=lambda: ["fkl", "hard_filter_fkl", "paced_fkl", "paced_fkl_then_rkl"])
    switch_step: int = 0
    fkl_samples: str = "teacher"
    threads: int = 1
    trainer: DistillConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        if min(self.teacher_warmup_steps, self.student_warmup_steps, self.switch_step, self.threads) < 0:
            raise ConfigError("warm-up steps, switch_step and threads must be >= 0")
        if self.student_hidden < 4 or self.student_hidden % 4 or self.student_layers < 1:
            raise ConfigError(
                f"student_hidden must be a multiple of 4 (4 attention heads) and student_layers >= 1, "
                f"got {self.student_hidden} and {self.student_layers}"
            )
        if self.fkl_samples not in ("teacher", "student"):
            raise ConfigError(f"fkl_samples must be 'teacher' or 'student', got {self.fkl_samples!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"variants must be a non-empty list of {sorted(VARIANTS)}, got {self.variants}")


def _student_config(hidden: int, layers: int) -> Any:
    from klcore.toy import tiny_config

    cfg = tiny_config("small")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = hidden, 3 * hidden, layers
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    cfg.head_dim = hidden // 4
    return cfg


def run(config: PacedToyConfig, run_dir: Path) -> dict[str, Any]:
    """Warm up teacher and student, run each variant from the same student; summary of the pass@1 table."""
    from klcore.toy import char_tokenizer, evaluate, get_task, tiny_causal_lm, tiny_config, warmup
    from opd_distill.trainer import DistillTrainer

    if config.threads:
        torch.set_num_threads(config.threads)
    cfg = config.trainer
    tok = char_tokenizer()
    task = get_task(config.task, **config.task_options)
    started = time.perf_counter()
    teacher = tiny_causal_lm(tiny_config(config.teacher_size), seed=cfg.seed)
    warmup(
        teacher,
        tok,
        task,
        steps=config.teacher_warmup_steps,
        batch_size=config.warmup_batch_size,
        lr=config.warmup_lr,
        seed=cfg.seed,
        eval_problems=0,
    )
    student = tiny_causal_lm(_student_config(config.student_hidden, config.student_layers), seed=cfg.seed + 1)
    warmup(
        student,
        tok,
        task,
        steps=config.student_warmup_steps,
        batch_size=config.warmup_batch_size,
        lr=config.warmup_lr,
        seed=cfg.seed + 1,
        eval_problems=0,
    )
    warm_seconds = time.perf_counter() - started
    teacher_pass = evaluate(teacher, tok, task, n=cfg.eval_problems, seed=cfg.seed + 99)
    switch = config.switch_step or max(1, cfg.steps // 2)

    histories: dict[str, list[dict[str, float]]] = {}
    for variant in config.variants:
        weighting, loss, then_loss = VARIANTS[variant]
        tc = copy.deepcopy(cfg)
        tc.loss, tc.then_loss, tc.switch_step = loss, then_loss, switch if then_loss else 0
        fkl_steps = (switch if then_loss else cfg.steps) if loss == "full_forward_kl" else 0
        tc.teacher_rollout_steps = fkl_steps if config.fkl_samples == "teacher" else 0
        tc.paced = PacedConfig(**{**vars(cfg.paced), "weighting": weighting})
        trainer = DistillTrainer(
            copy.deepcopy(student), teacher, tok, task, tc, run_dir=run_dir / variant, eval_tasks={task.name: task}
        )
        histories[variant] = trainer.train()

    key = f"eval/{task.name}_pass@1"
    initial = next(iter(histories.values()))[0][key]
    rows: list[list[object]] = [["initial student", initial, "", ""]]
    summary: dict[str, Any] = {
        "teacher/pass@1": teacher_pass,
        "initial/pass@1": initial,
        "warmup_seconds": warm_seconds,
    }
    for variant, h in histories.items():
        final = h[-1][f"{key}_final"]
        weights = [r["paced/weight_zero_frac"] for r in h]
        rows.append([variant, final, max(curve(h, key, f"{key}_final")[1]), sum(weights) / len(weights)])
        summary[f"{variant}/pass@1"] = final
        summary[f"{variant}/zero_weight_frac"] = sum(weights) / len(weights)
    rows.append([f"teacher ({config.teacher_size})", teacher_pass, "", ""])
    plot_curves(
        run_dir / "pass_at_1.png",
        {v: curve(h, key, f"{key}_final") for v, h in histories.items()},
        title=f"held-out greedy pass@1 ({task.name})",
        ylabel="pass@1",
        lines={"teacher": teacher_pass, "initial student": initial},
    )
    plot_curves(
        run_dir / "kl.png",
        {v: curve(h, "kl/forward") for v, h in histories.items()},
        title="KL(T || S) on student samples",
        ylabel="nats",
    )
    table = markdown_table(["variant", "final pass@1", "best pass@1", "zero-weight fraction of rows"], rows)
    p = cfg.paced
    (run_dir / "report.md").write_text(
        "# paced-toy\n\n"
        f"{task.name} {config.task_options}; teacher = toy `{config.teacher_size}` Llama "
        f"({config.teacher_warmup_steps} warm-up steps), student = {config.student_layers}-layer width-"
        f"{config.student_hidden} Llama ({config.student_warmup_steps} warm-up steps). {cfg.steps} distillation "
        f"steps of {cfg.prompts_per_step} problems x {cfg.group_size} student samples from a pool of "
        f"{cfg.problem_pool}; PACED alpha={p.alpha}, beta={p.beta}, K={p.samples}, re-estimated every "
        f"{p.every or 'never (once)'} steps, weights {'normalised to mean 1' if p.normalize else 'raw'}; "
        f"FKL->RKL switch at step {switch}; forward-KL stages on {config.fkl_samples}-written completions, "
        f"reverse-KL stages on the student's. pass@1: greedy, {cfg.eval_problems} held-out problems.\n\n"
        f"{table}\n\n![pass@1](pass_at_1.png)\n\n![kl](kl.png)\n"
    )
    summary["table"] = table
    summary["run_dir"] = str(run_dir)
    return summary


__all__ = ["VARIANTS", "PacedToyConfig", "run"]
