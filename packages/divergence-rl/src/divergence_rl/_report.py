"""The dph-toy report: the results table, PNG plots (matplotlib, Agg) and report.md."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from klcore.config import to_dict

History = list[dict[str, float]]


def _last(history: History, key: str) -> float | None:
    values = [r[key] for r in history if key in r]
    return values[-1] if values else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _domains(task: str, ood: str | None) -> list[tuple[str, str]]:
    return [("in", task)] + ([("ood", f"ood_{ood}")] if ood else [])


def table(histories: dict[str, list[History]], base: dict[str, float], ks: list[int], task: str,
          ood: str | None) -> dict[str, dict[str, float | None]]:
    """Per method (and ``base``): final Pass@k in/out of domain and rehearsal divergences, mean over seeds."""
    out: dict[str, dict[str, float | None]] = {"base": {}}
    for label, name in _domains(task, ood):
        for k in ks:
            out["base"][f"{label}_pass@{k}"] = base[f"eval/{name}_pass_at_{k}"]
    out["base"].update({"rehearsal_forward_kl": 0.0, "rehearsal_js": 0.0})
    for method, runs in histories.items():
        row: dict[str, float | None] = {}
        for label, name in _domains(task, ood):
            for k in ks:
                row[f"{label}_pass@{k}"] = _mean([_last(h, f"eval/{name}_pass_at_{k}") for h in runs])
        row["rehearsal_forward_kl"] = _mean([_last(h, "rehearsal/forward_kl") for h in runs])
        row["rehearsal_js"] = _mean([_last(h, "rehearsal/js") for h in runs])
        row["reward_last10"] = _mean([statistics.fmean(r["reward/mean"] for r in h[-10:]) for h in runs])
        out[method] = row
    return out


def _curve(runs: list[History], key: str) -> tuple[list[int], list[float]]:
    steps = sorted({r["step"] for h in runs for r in h if key in r})
    values = [statistics.fmean(r[key] for h in runs for r in h if r["step"] == s and key in r) for s in steps]
    return [int(s) + 1 for s in steps], values


def plots(histories: dict[str, list[History]], base: dict[str, float], ks: list[int], task: str, ood: str | None,
          run_dir: Path) -> None:
    """``pass_at_k.png`` (rows: domains, columns: k) and ``rehearsal_divergence.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = _domains(task, ood)
    fig, axes = plt.subplots(len(domains), len(ks), figsize=(4.5 * len(ks), 3.5 * len(domains)), squeeze=False)
    for i, (label, name) in enumerate(domains):
        for j, k in enumerate(ks):
            key = f"eval/{name}_pass_at_{k}"
            ax = axes[i][j]
            for method, runs in histories.items():
                x, y = _curve(runs, key)
                ax.plot([0, *x], [base[key], *y], marker="o", markersize=3, label=method)
            ax.set_title(f"{'in-domain' if label == 'in' else 'out-of-domain'} {name.removeprefix('ood_')}: Pass@{k}")
            ax.set_xlabel("updates")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "pass_at_k.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), squeeze=False)
    for j, kind in enumerate(("forward_kl", "js")):
        ax = axes[0][j]
        for method, runs in histories.items():
            x, y = _curve(runs, f"rehearsal/{kind}")
            ax.plot([0, *x], [0.0, *y], marker="o", markersize=3, label=method)
        ax.set_title(f"rehearsal set: token-mean {kind} to the initial policy")
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "rehearsal_divergence.png", dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(summary: dict[str, Any], config: Any, run_dir: Path) -> None:
    """``report.md``: the table, the pre-sampling split, step times and the config."""
    table = summary["methods"]
    cols = list(dict.fromkeys(c for row in table.values() for c in row))
    lines = ["# dph-toy report", "", "Final values (after the last update; mean over seeds). Base = the initial policy.",
             "", "| method | " + " | ".join(cols) + " | median step s |",
             "|" + "---|" * (len(cols) + 2)]
    for method, row in table.items():
        step = summary["step_seconds_median"].get(method)
        lines.append(f"| {method} | " + " | ".join(_fmt(row.get(c)) for c in cols) + f" | {_fmt(step)} |")
    p = summary["presample"]
    lines += ["", f"Pre-sampling: {p['prompts']} training prompts, mean pass rate {p['mean_pass_rate']:.3f}, "
              f"rehearsal set {p['rehearsal_prompts']}, exploration set {p['exploration_prompts']}.",
              f"Total time {summary['total_seconds']:.0f} s wall, {summary['total_cpu_seconds']:.0f} s CPU (process "
              "time; the wall time depends on what else shares the CPU).", "",
              "| phase | wall s | CPU s |", "|---|---|---|",
              *[f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |" for k, v in summary["phases"].items()], "",
              "![Pass@k](pass_at_k.png)", "", "![rehearsal divergence](rehearsal_divergence.png)", "",
              "## Config", "", "```json", json.dumps(to_dict(config), indent=2), "```", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
