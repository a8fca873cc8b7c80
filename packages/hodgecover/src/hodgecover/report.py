"""Figures and tables of a HodgeCover run (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hodgecover.pipeline import LayerAnalysis

COMPONENTS = ("gradient", "curl", "harmonic")


def layer_table(analyses: dict[int, LayerAnalysis]) -> list[dict[str, Any]]:
    """Per layer: complex size, beta numbers at ``tau*``, energy share of each Hodge component and the residual."""
    rows = []
    for layer, a in analyses.items():
        total = max(a.parts.energies["total"], 1e-300)
        rows.append({
            "layer": layer,
            "experts": a.num_experts,
            "edges": a.complex.num_edges,
            "triangles": a.complex.num_triangles,
            "candidate_triangles": len(a.triangles),
            "tau_star": a.curve.best_threshold if a.curve is not None else None,
            "tau_star_is_last": a.curve is not None and a.curve.best_index == len(a.curve.thresholds) - 1,
            "betti": list(a.complex.betti_numbers()),
            **{f"energy/{c}": a.parts.energies[c] / total for c in COMPONENTS},
            "residual": a.parts.residual,
        })
    return rows


def plot_energy(analyses: dict[int, LayerAnalysis], path: Path) -> None:
    """Stacked bars: share of barrier energy in each Hodge component per layer."""
    layers = list(analyses)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(layers) + 2), 3.5))
    bottom = [0.0] * len(layers)
    for c in COMPONENTS:
        share = [analyses[k].parts.energies[c] / max(analyses[k].parts.energies["total"], 1e-300) for k in layers]
        ax.bar([str(k) for k in layers], share, bottom=bottom, label=c)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("share of ||b||^2")
    ax.set_title("Hodge energy of the barrier cochain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_filtration(analyses: dict[int, LayerAnalysis], path: Path) -> None:
    """beta_1 of ``K_tau`` against the threshold for every layer, ``tau*`` marked."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, a in analyses.items():
        if a.curve is None:
            continue
        line = ax.plot(a.curve.thresholds, a.curve.beta1, label=f"layer {k}")[0]
        ax.axvline(a.curve.best_threshold, color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("threshold tau (barrier, nats)")
    ax.set_ylabel("beta_1")
    ax.set_title("filtration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perplexity(results: list[dict[str, Any]], baseline: float, path: Path) -> None:
    """Grouped bars: perplexity per method for each ratio, the uncompressed model as a line."""
    ratios = sorted({r["ratio"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods) + 2), 3.8))
    width = 0.8 / max(len(ratios), 1)
    for n, ratio in enumerate(ratios):
        vals = [next((r["ppl"] for r in results if r["method"] == m and r["ratio"] == ratio), float("nan"))
                for m in methods]
        ax.bar([i + n * width for i in range(len(methods))], vals, width=width, label=f"ratio {ratio}")
    ax.axhline(baseline, color="k", ls="--", lw=1, label="uncompressed")
    ax.set_xticks([i + width * (len(ratios) - 1) / 2 for i in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["COMPONENTS", "layer_table", "markdown_table", "plot_energy", "plot_filtration", "plot_perplexity"]
