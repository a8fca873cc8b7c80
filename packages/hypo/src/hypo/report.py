"""The ``hypo-toy`` report: a summary table (markdown) and curves of reward and reverse KL (PNG)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

History = list[dict[str, float]]
CURVES = (("eval/reward", "held-out reward (sampled)"), ("eval/reverse_kl", "held-out reverse KL(π‖π_ref), nats"))


def _curve(history: History, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of an eval metric: logged before a step's update, plus the final one after the last."""
    steps = [int(r["step"]) for r in history if key in r]
    values = [r[key] for r in history if key in r]
    last = history[-1]
    if f"{key}_final" in last:
        steps.append(int(last["step"]) + 1)
        values.append(last[f"{key}_final"])
    return steps, values


def _final(history: History, key: str) -> float:
    return _curve(history, key)[1][-1]


def _plot(results: dict[str, dict[int, History]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(10, 3.6))
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        for name, color in (("dpo", "tab:red"), ("hypo", "tab:blue")):
            runs = [_curve(h, key) for h in results[name].values()]
            steps = runs[0][0]
            columns = list(zip(*(v for _, v in runs), strict=True))
            ax.plot(steps, [statistics.median(c) for c in columns], color=color, label=name.upper().replace("HYPO", "HyPO"))
            if len(runs) > 1:
                ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    results: dict[str, dict[int, History]], run_dir: Path, *, config: dict[str, Any], seconds: float, cpu_seconds: float
) -> dict[str, Any]:
    """Write ``report.md`` and ``curves.png`` into ``run_dir``; return the summary (means over seeds)."""
    rows = []
    summary: dict[str, Any] = {"seeds": sorted(next(iter(results.values()))), "seconds": round(seconds, 1),
                               "cpu_seconds": round(cpu_seconds, 1)}
    for name, runs in results.items():
        stats = {
            "eval/reward_start": statistics.mean(_curve(h, "eval/reward")[1][0] for h in runs.values()),
            "eval/reward_final": statistics.mean(_final(h, "eval/reward") for h in runs.values()),
            "eval/reverse_kl_final": statistics.mean(_final(h, "eval/reverse_kl") for h in runs.values()),
            "eval/reverse_kl_max": statistics.mean(max(_curve(h, "eval/reverse_kl")[1]) for h in runs.values()),
            "eval/length_mean_final": statistics.mean(_final(h, "eval/length_mean") for h in runs.values()),
            "rewards/accuracy_last": statistics.mean(h[-1]["rewards/accuracy"] for h in runs.values()),
            "dpo/loss_last": statistics.mean(h[-1]["dpo/loss"] for h in runs.values()),
        }
        summary[name] = {k: round(v, 4) for k, v in stats.items()}
        rows.append(
            f"| {name} | {stats['eval/reward_start']:.3f} | {stats['eval/reward_final']:.3f} | "
            f"{stats['eval/reverse_kl_final']:.3f} | {stats['eval/reverse_kl_max']:.3f} | "
            f"{stats['eval/length_mean_final']:.2f} | {stats['rewards/accuracy_last']:.2f} | {stats['dpo/loss_last']:.3f} |"
        )
    _plot(results, run_dir / "curves.png")
    trainer = config["trainer"]
    text = "\n".join([
        "# hypo-toy: DPO vs HyPO",
        "",
        f"Task `{config['task']}` {config['task_options']}, model `{config['model_size']}`, reference = SFT warm-up "
        f"({config['warmup_steps']} steps). Offline data: {config['offline_prompts']} distinct training prompts, one "
        "pair each (chosen = correct answer, rejected = a wrong reference sample). Evaluation: "
        f"{config['eval_prompts']} held-out prompts x {trainer['eval_samples']} samples at temperature 1.",
        f"Trainer: {trainer['steps']} steps, lr {trainer['lr']}, beta {trainer['beta']}, loss `{trainer['loss']}`, "
        f"{trainer['pairs_per_step']} pairs/step; HyPO lambda = {trainer['kl_coef']}, k = {trainer['group_size']}. "
        f"Seeds {summary['seeds']} (means over seeds below). Wall time {seconds:.0f} s, CPU time {cpu_seconds:.0f} s "
        "(wall time depends on what else shares the CPU).",
        "",
        "| method | reward start | reward final | reverse KL final | reverse KL max | length final | "
        "train pair accuracy (last step) | DPO loss (last step) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "![reward and reverse KL over training](curves.png)",
        "",
    ])
    (run_dir / "report.md").write_text(text)
    return summary


__all__ = ["write_report"]
