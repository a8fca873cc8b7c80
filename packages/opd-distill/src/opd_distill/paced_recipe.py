"""Recipe ``paced-toy``: PACED on toy addition with a gated teacher and a smaller student, through
``klcore.experiments``.

One teacher (klcore's ``small`` toy Llama, warmed up from ``teacher_seed``) serves every seed; it must
reach ``teacher_gate`` greedy pass@1 on held-out problems or the recipe stops with a ``ConfigError``.
Per seed a narrower student is warmed up briefly, then each variant runs the on-policy distillation
loop from that same student on a pool of ``trainer.problem_pool`` training problems: unweighted,
hard-filter and PACED-weighted forward KL (and the other ``VARIANTS``). Every run reports held-out
greedy pass@1 and the pool's pass-rate distribution (before training and after it); the report adds a
histogram of the pool's pass rates (``pool_pass_rates.png``).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klcore.errors import ConfigError
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
FIGURES = ["eval/addition_pass@1", "kl/forward", "paced/weight_zero_frac", "success/mean"]


def _default_trainer() -> DistillConfig:
    return DistillConfig(
        steps=1000,
        warmup_steps=50,
        lr=1e-3,
        prompts_per_step=8,
        group_size=2,
        problem_pool=4096,
        eval_every=250,
        eval_problems=512,
        paced=PacedConfig(samples=4, every=250),
    )


@dataclass
class PacedToyConfig:
    """Task, models, warm-ups, the teacher's gate, variants and seeds. ``switch_step = 0`` switches
    FKL -> RKL at half the steps. ``fkl_samples``: ``teacher`` trains the forward-KL stage on
    teacher-written completions (PACED v1's reference responses), ``student`` on the student's own;
    reverse-KL stages always use the student's. ``teacher_gate``: the teacher's greedy pass@1 on
    ``trainer.eval_problems`` held-out problems must reach it. ``trainer.paced`` holds K, the
    re-estimation period, alpha, beta and the normalisation flag; ``trainer.seed`` is set per seed."""

    task: str = "addition"
    task_options: dict[str, int] = field(default_factory=lambda: {"digits": 2})
    teacher_size: str = "small"
    teacher_seed: int = 0
    teacher_warmup_steps: int = 2000
    teacher_gate: float = 0.9
    student_hidden: int = 32
    student_layers: int = 2
    student_warmup_steps: int = 300
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    variants: list[str] = field(default_factory=lambda: ["fkl", "hard_filter_fkl", "paced_fkl"])
    switch_step: int = 0
    fkl_samples: str = "teacher"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    threads: int = 1
    trainer: DistillConfig = field(default_factory=_default_trainer)

    def __post_init__(self) -> None:
        if min(self.teacher_warmup_steps, self.student_warmup_steps, self.switch_step, self.threads,
               self.teacher_seed) < 0:
            raise ConfigError("warm-up steps, switch_step, threads and teacher_seed must be >= 0")
        if not 0.0 <= self.teacher_gate <= 1.0:
            raise ConfigError(f"teacher_gate is a pass@1 in [0, 1], got {self.teacher_gate!r}")
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
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of ints >= 0, got {self.seeds!r}")


def _student_config(hidden: int, layers: int) -> Any:
    from klcore.toy import tiny_config

    cfg = tiny_config("small")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = hidden, 3 * hidden, layers
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    cfg.head_dim = hidden // 4
    return cfg


def pass_rate_histogram(rates: torch.Tensor, samples: int) -> dict[str, float]:
    """Fractions of the pool at each possible pass rate c / K (``rate_<c>of<K>``), and in (0, 1)."""
    counts = torch.round(rates.float() * samples).long()
    out = {f"rate_{c}of{samples}": float((counts == c).float().mean()) for c in range(samples + 1)}
    out["in_open_interval"] = float(((counts > 0) & (counts < samples)).float().mean())
    return out


def _warm(model: Any, path: Path, tok: Any, task: Any, steps: int, config: PacedToyConfig, seed: int) -> Any:
    """``model`` warmed up ``steps`` SFT steps from ``seed``, or loaded from ``path`` where saved before."""
    from klcore.toy import warmup

    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    warmup(model, tok, task, steps=steps, batch_size=config.warmup_batch_size, lr=config.warmup_lr, seed=seed,
           eval_problems=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


class _Setting:
    """The experiment's shared pieces: the gated teacher, and one warmed-up student per seed."""

    def __init__(self, config: PacedToyConfig, run_dir: Path) -> None:
        from klcore.toy import char_tokenizer, evaluate, get_task, tiny_causal_lm, tiny_config

        self.config, self.run_dir = config, run_dir
        self.tok = char_tokenizer()
        self.task = get_task(config.task, **config.task_options)
        teacher = tiny_causal_lm(tiny_config(config.teacher_size), seed=config.teacher_seed)
        self.teacher = _warm(teacher, run_dir / "models" / "teacher.pt", self.tok, self.task,
                             config.teacher_warmup_steps, config, config.teacher_seed).eval()
        n = config.trainer.eval_problems
        self.teacher_pass = evaluate(self.teacher, self.tok, self.task, n=n, seed=99)
        if self.teacher_pass < config.teacher_gate:
            raise ConfigError(
                f"the warmed-up teacher's greedy pass@1 is {self.teacher_pass:.3f} on {n} held-out problems, below "
                f"teacher_gate = {config.teacher_gate}; raise teacher_warmup_steps (now {config.teacher_warmup_steps}) "
                f"or change teacher_seed, and delete {run_dir / 'models' / 'teacher.pt'}"
            )
        self._students: dict[int, Any] = {}

    def student(self, seed: int) -> Any:
        from klcore.toy import tiny_causal_lm

        if seed not in self._students:
            cfg = self.config
            model = tiny_causal_lm(_student_config(cfg.student_hidden, cfg.student_layers), seed=seed + 1)
            self._students[seed] = _warm(model, self.run_dir / "models" / f"student-seed-{seed}.pt", self.tok,
                                         self.task, cfg.student_warmup_steps, cfg, seed + 1)
        return self._students[seed]


def _trainer_config(config: PacedToyConfig, variant: str, seed: int) -> DistillConfig:
    weighting, loss, then_loss = VARIANTS[variant]
    tc = copy.deepcopy(config.trainer)
    switch = config.switch_step or max(1, tc.steps // 2)
    tc.seed, tc.loss, tc.then_loss, tc.switch_step = seed, loss, then_loss, switch if then_loss else 0
    fkl_steps = (switch if then_loss else tc.steps) if loss == "full_forward_kl" else 0
    tc.teacher_rollout_steps = fkl_steps if config.fkl_samples == "teacher" else 0
    tc.paced = PacedConfig(**{**vars(tc.paced), "weighting": weighting})
    return tc


def _run_one(setting: _Setting, variant: str, seed: int, run_dir: Path) -> dict[str, float]:
    """Distil the seed's student with ``variant``; held-out pass@1 and the pool's pass rates before and after."""
    from opd_distill.trainer import DistillTrainer

    cfg = setting.config
    tc = _trainer_config(cfg, variant, seed)
    trainer = DistillTrainer(copy.deepcopy(setting.student(seed)), setting.teacher, setting.tok, setting.task, tc,
                             run_dir=run_dir, eval_tasks={setting.task.name: setting.task})
    k = tc.paced.samples
    # the same draws for every variant of a seed: the initial pool histogram is the same student's
    before = trainer.estimate_pass_rates(torch.Generator().manual_seed(10_000 + seed))
    history = trainer.train()
    after = trainer.estimate_pass_rates(torch.Generator().manual_seed(20_000 + seed))
    (run_dir / "pool_pass_rates.json").write_text(json.dumps({"samples": k, "before": before.tolist(),
                                                              "after": after.tolist()}))
    key = f"eval/{setting.task.name}_pass@1"
    evals = [r[key] for r in history if key in r] + [history[-1][f"{key}_final"]]
    zero = [r["paced/weight_zero_frac"] for r in history]
    out = {
        "pass@1_final": evals[-1],
        "pass@1_best": max(evals),
        "pass@1_start": evals[0],
        "teacher_pass@1": setting.teacher_pass,
        "pool_distinct": len({p.prompt for p in trainer.pool}) / len(trainer.pool),
        "zero_weight_frac_mean": sum(zero) / len(zero),
        "all_weights_zero_steps": sum(r["paced/all_weights_zero"] for r in history) / len(history),
    }
    out.update({f"pool_before/{n}": v for n, v in pass_rate_histogram(before, k).items()})
    out.update({f"pool_after/{n}": v for n, v in pass_rate_histogram(after, k).items()})
    return out


def _plot_histograms(root: Path, variants: list[str], seeds: list[int], path: Path) -> None:
    """Pool pass-rate histograms: the initial students (all seeds) and each variant's students after training."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def rates(variant: str, when: str) -> tuple[list[float], int]:
        records = [json.loads((root / variant / f"seed-{s}" / "pool_pass_rates.json").read_text()) for s in seeds]
        return [r for rec in records for r in rec[when]], records[0]["samples"]

    panels = [("initial student", *rates(variants[0], "before"))]
    panels += [(f"after {v}", *rates(v, "after")) for v in variants]
    fig = Figure(figsize=(3.0 * len(panels), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, values, k) in zip(axes, panels, strict=True):
        ax.hist(values, bins=[(c - 0.5) / k for c in range(k + 2)], weights=[1.0 / len(values)] * len(values))
        ax.set(title=title, xlabel=f"pass rate (K = {k})")
    axes[0].set_ylabel(f"fraction of pool (all {len(seeds)} seeds)")
    fig.savefig(path, dpi=100)


def run(config: PacedToyConfig, run_dir: Path) -> dict[str, Any]:
    """Gate the teacher, then every variant x seed through ``klcore.experiments.run_experiment`` (resumable);
    the report gets the pool's pass-rate histogram. Returns (and writes) the summary."""
    from klcore.experiments import run_experiment

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    setting = _Setting(config, run_dir)
    t, p = config.trainer, config.trainer.paced
    result = run_experiment(
        lambda variant, _options, seed, folder: _run_one(setting, variant, seed, folder),
        list(config.variants), config.seeds, run_dir / "experiment",
        title=f"paced-toy: {config.task} {config.task_options}, teacher pass@1 {setting.teacher_pass:.3f}, "
              f"{t.steps} steps of {t.prompts_per_step} x {t.group_size}, pool {t.problem_pool}, PACED alpha {p.alpha} "
              f"beta {p.beta} K {p.samples} every {p.every}",
        figure_metrics=FIGURES,
    )
    _plot_histograms(result.out, list(config.variants), list(config.seeds), result.out / "pool_pass_rates.png")
    report = result.out / "report.md"
    report.write_text(report.read_text() + "\n## Pool pass rates\n\n![pool pass rates](pool_pass_rates.png)\n")
    summary = {"experiment": result.summary, "teacher_pass@1": setting.teacher_pass, "report": str(report),
               "seconds": time.perf_counter() - started}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["VARIANTS", "PacedToyConfig", "pass_rate_histogram", "run"]
