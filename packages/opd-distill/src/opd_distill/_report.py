"""Markdown tables and PNG curves for the recipes' run folders (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(
    path: Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    ylabel: str,
    lines: Mapping[str, float] | None = None,
) -> None:
    """One line per named ``(steps, values)`` curve, plus dashed horizontal reference ``lines``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    for name, y in (lines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (0, y), fontsize=8, color="gray", va="bottom")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve(history: Sequence[Mapping[str, float]], key: str, final_key: str = "") -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` where logged; ``final_key`` adds the post-training value at ``steps``."""
    xs = [float(h["step"]) for h in history if key in h]
    ys = [float(h[key]) for h in history if key in h]
    if final_key and history and final_key in history[-1]:
        xs.append(float(history[-1]["step"]) + 1)
        ys.append(float(history[-1][final_key]))
    return xs, ys
