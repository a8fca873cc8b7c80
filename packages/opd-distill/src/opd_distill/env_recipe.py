"""Recipe ``opd-env-toy``: VLA-OPD on ``PickBlockEnv`` (2 CPU cores, about a minute).

A scripted teacher (good but not perfect: nearly flat on unfamiliar states) demonstrates a few
episodes; a small action-token student is behaviour-cloned on them; then, from that same initial
student, each objective (reverse-KL OPD, forward KL, hard CE, ...) runs the on-policy loop. The report
compares the held-out success rate and the student entropy with the initial student and the teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klcore.errors import ConfigError
from opd_distill._report import curve, markdown_table, plot_curves
from opd_distill.config import EnvDistillConfig
from opd_distill.objectives import OBJECTIVES

_LABELS = {
    "opd_reinforce": "reverse-KL OPD (REINFORCE)",
    "opd_ppo": "reverse-KL OPD (PPO)",
    "full_reverse_kl": "full-vocab reverse KL",
    "full_forward_kl": "forward KL",
    "full_jsd": "JSD(beta)",
    "hard_ce": "hard CE",
}


def _default_trainer() -> EnvDistillConfig:
    return EnvDistillConfig(steps=100, tasks_per_step=8, group_size=8, eval_every=10, eval_episodes=300)


@dataclass
class OPDEnvToyConfig:
    """Environment, teacher, behaviour cloning and the objectives compared; ``trainer`` is shared."""

    size: int = 5
    max_steps: int = 12
    teacher_margin: float = 4.0
    teacher_unsure_margin: float = 0.5
    demos: int = 2
    bc_steps: int = 200
    bc_lr: float = 3e-3
    hidden: int = 64
    methods: list[str] = field(default_factory=lambda: ["opd_reinforce", "full_forward_kl", "hard_ce"])
    threads: int = 1
    trainer: EnvDistillConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        if self.demos < 1 or self.bc_steps < 0 or self.threads < 0 or self.hidden < 1:
            raise ConfigError("need demos >= 1, bc_steps >= 0, hidden >= 1 and threads >= 0")
        unknown = [m for m in self.methods if m not in OBJECTIVES]
        if unknown or not self.methods:
            raise ConfigError(f"methods must be a non-empty list of {sorted(OBJECTIVES)}, got {self.methods}")


def _teacher_entropy(teacher: Any, make_env: Any, seeds: range, seed: int) -> float:
    from opd_distill.policies import rollout

    eps = rollout(teacher, make_env, seeds, generator=torch.Generator().manual_seed(seed))
    t = eps.actions.shape[1]
    logits = teacher(eps.image.flatten(0, 1), eps.instruction.repeat_interleave(t))
    lp = torch.log_softmax(logits.float(), -1)
    ent = -(lp.exp() * lp).sum(-1).view(eps.actions.shape)
    return float((ent * eps.mask).sum() / eps.mask.sum())


def run(config: OPDEnvToyConfig, run_dir: Path) -> dict[str, Any]:
    """Behaviour-clone the student, run every method from it, write the report; summary of the table."""
    from opd_distill.env import PickBlockEnv
    from opd_distill.env_trainer import EVAL_SEED_START, EnvDistillTrainer
    from opd_distill.policies import (
        ActionTokenPolicy,
        ScriptedTeacher,
        behaviour_cloning,
        rollout,
        success_rate,
        successful,
    )

    if config.threads:
        torch.set_num_threads(config.threads)
    cfg = config.trainer

    def make_env() -> PickBlockEnv:
        return PickBlockEnv(size=config.size, max_steps=config.max_steps)

    teacher = ScriptedTeacher(config.teacher_margin, config.teacher_unsure_margin)
    eval_seeds = range(EVAL_SEED_START, EVAL_SEED_START + cfg.eval_episodes)
    demos = successful(rollout(teacher, make_env, range(config.demos), greedy=True))
    torch.manual_seed(cfg.seed)
    env = make_env()
    student = ActionTokenPolicy(env.observation_space["image"].shape, env.action_space.n, hidden=config.hidden)  # type: ignore[union-attr]
    bc = behaviour_cloning(student, demos, steps=config.bc_steps, lr=config.bc_lr, seed=cfg.seed)
    teacher_success = success_rate(teacher, make_env, eval_seeds, seed=cfg.seed + 99)
    teacher_entropy = _teacher_entropy(teacher, make_env, eval_seeds, cfg.seed + 99)

    histories: dict[str, list[dict[str, float]]] = {}
    for method in config.methods:
        trainer_cfg = copy.deepcopy(cfg)
        trainer_cfg.loss = method
        trainer = EnvDistillTrainer(copy.deepcopy(student), teacher, make_env, trainer_cfg, run_dir=run_dir / method)
        histories[method] = trainer.train()

    first = next(iter(histories.values()))[0]
    rows: list[list[object]] = [
        ["initial student (BC)", first["eval/success"], first["entropy/mean"], first["kl/reverse"]]
    ]
    summary: dict[str, Any] = {
        "demos_used": int(demos.success.numel()),
        "bc_final_loss": bc[-1] if bc else None,
        "initial/success": first["eval/success"],
        "initial/entropy": first["entropy/mean"],
        "teacher/success": teacher_success,
        "teacher/entropy": teacher_entropy,
    }
    k = max(1, cfg.steps // 10)
    for method, h in histories.items():
        entropy_end = sum(r["entropy/mean"] for r in h[-k:]) / len(h[-k:])
        kl_end = sum(r["kl/reverse"] for r in h[-k:]) / len(h[-k:])
        rows.append([_LABELS[method], h[-1]["eval/success_final"], entropy_end, kl_end])
        summary[f"{method}/success"] = h[-1]["eval/success_final"]
        summary[f"{method}/entropy_end"] = entropy_end
        summary[f"{method}/kl_reverse_end"] = kl_end
        summary[f"{method}/best_success"] = max(v for v in curve(h, "eval/success", "eval/success_final")[1])
    rows.append(["teacher (scripted, sampled)", teacher_success, teacher_entropy, 0.0])

    plot_curves(
        run_dir / "success.png",
        {_LABELS[m]: curve(h, "eval/success", "eval/success_final") for m, h in histories.items()},
        title="held-out success rate (sampled student)",
        ylabel="success rate",
        lines={"teacher": teacher_success, "initial student": first["eval/success"]},
    )
    plot_curves(
        run_dir / "entropy.png",
        {_LABELS[m]: curve(h, "entropy/mean") for m, h in histories.items()},
        title="student entropy on its own states",
        ylabel="nats",
        lines={"teacher": teacher_entropy},
    )
    table = markdown_table(
        ["policy", "held-out success", f"entropy (last {k} steps)", f"KL(S||T) (last {k} steps)"], rows
    )
    (run_dir / "report.md").write_text(
        "# opd-env-toy\n\n"
        f"PickBlockEnv {config.size}x{config.size}, {config.max_steps} steps; student behaviour-cloned on "
        f"{summary['demos_used']} teacher demonstrations; {cfg.steps} OPD steps of B={cfg.tasks_per_step} tasks x "
        f"G={cfg.group_size} rollouts; success over {cfg.eval_episodes} held-out tasks (sampled actions).\n\n"
        f"{table}\n\n![success](success.png)\n\n![entropy](entropy.png)\n"
    )
    summary["table"] = table
    summary["run_dir"] = str(run_dir)
    return summary


__all__ = ["OPDEnvToyConfig", "run"]
