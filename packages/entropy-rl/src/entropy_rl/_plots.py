"""Matplotlib figures of the recipes (private; backend Agg, written as PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from entropy_rl.law import EntropyLawFit


def _law_axes(ax, entropy: np.ndarray, performance: np.ndarray, fit: EntropyLawFit | None, label: str, n_fit: int, color=None) -> None:
    ax.scatter(entropy[n_fit:], performance[n_fit:], s=10, alpha=0.6, color=color, label=f"{label}")
    if n_fit:
        ax.scatter(entropy[:n_fit], performance[:n_fit], s=14, marker="x", color=color, label=f"{label}: fitted part")
    if fit is not None:
        grid = np.linspace(0.0, max(float(entropy.max()), 1e-3) * 1.05, 200)
        ax.plot(grid, fit.predict(grid), color=color, lw=1.5,
                label=f"{label}: R = {-fit.a:.3g} e^H {fit.b:+.3g} (R² {fit.r2:.2f})")


def law_plot(path: Path, entropy: Sequence[float] | np.ndarray, performance: Sequence[float] | np.ndarray, fit: EntropyLawFit,
             *, n_fit: int = 0, performance_name: str = "performance", holds: bool = True) -> None:
    """Entropy vs performance with the fitted curve; the points used for the fit marked when ``n_fit``."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    _law_axes(ax, np.asarray(entropy), np.asarray(performance), fit, "run", n_fit)
    ax.set_xlabel("entropy H (nats)")
    ax.set_ylabel(performance_name)
    ax.set_title(f"entropy-performance law, ceiling b - a = {fit.ceiling:.3g}" if holds else
                 f"no law (a = {fit.a:.3g}, R² = {fit.r2:.2f}): no ceiling")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def toy_report_plot(path: Path, histories: Mapping[str, list[dict[str, float]]], fits: Mapping[str, EntropyLawFit | None]) -> None:
    """Four panels: entropy and reward curves, predicted vs measured entropy change, the law per method."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    colors = dict(zip(histories, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name, rows in histories.items():
        steps = [r["step"] for r in rows]
        c = colors[name]
        axes[0, 0].plot(steps, [r["entropy/mean"] for r in rows], color=c, label=name)
        axes[0, 1].plot(steps, [r["reward/mean"] for r in rows], color=c, alpha=0.35)
        k = max(1, len(rows) // 20)
        smooth = np.convolve([r["reward/mean"] for r in rows], np.ones(k) / k, mode="valid")
        axes[0, 1].plot(steps[k - 1 :], smooth, color=c, label=f"{name} (mean of {k})")
        pred = [r.get("dynamics/predicted_change", np.nan) for r in rows]
        act = [r.get("dynamics/actual_change", np.nan) for r in rows]
        axes[1, 0].scatter(pred, act, s=8, alpha=0.6, color=c, label=name)
        entropy = np.array([r["entropy/mean"] for r in rows])
        reward = np.array([r["reward/mean"] for r in rows])
        _law_axes(axes[1, 1], entropy, reward, fits.get(name), name, 0, color=c)
    lim = np.nanmax(np.abs([a for ax in [axes[1, 0]] for a in ax.get_xlim() + ax.get_ylim()]))
    axes[1, 0].plot([-lim, lim], [-lim, lim], "k--", lw=0.8, label="y = x")
    axes[0, 0].set(xlabel="step", ylabel="token entropy (nats)", title="entropy")
    axes[0, 1].set(xlabel="step", ylabel="training reward", title="reward")
    axes[1, 0].set(xlabel="predicted ΔH (first order, Lemma 1)", ylabel="measured ΔH", title="entropy change per step")
    axes[1, 1].set(xlabel="entropy H (nats)", ylabel="training reward", title="R = -a e^H + b per method")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
