"""Recipe ``entropy-law``: fit R = -a exp(H) + b to a run's metrics; PNG plot, markdown report, JSON summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entropy_rl import _plots
from entropy_rl._metrics_file import read_metrics
from entropy_rl.law import extrapolate_entropy_law, fit_entropy_law
from klcore.errors import ConfigError, DataError


@dataclass
class EntropyLawConfig:
    """``metrics``: a run folder or its ``metrics.jsonl``; the series are the steps holding both keys.

    ``fit_fraction``: share of the run (first points) used for the extrapolation check.
    """

    metrics: str = ""
    entropy_key: str = "entropy/mean"
    performance_key: str = "reward/mean"
    fit_fraction: float = 0.15

    def __post_init__(self) -> None:
        if not 0 < self.fit_fraction < 1:
            raise ConfigError(f"fit_fraction must be in (0, 1), got {self.fit_fraction!r}")
        if not self.entropy_key or not self.performance_key:
            raise ConfigError("entropy_key and performance_key must name metrics")


def run(config: EntropyLawConfig, run_dir: Path) -> dict[str, Any]:
    if not config.metrics:
        raise ConfigError("pass the run to fit: klcore run entropy-law --set metrics=RUN_DIR_OR_METRICS_JSONL")
    rows = read_metrics(config.metrics)
    keys = (config.entropy_key, config.performance_key)
    pairs = [(_number(r, keys[0], i), _number(r, keys[1], i)) for i, r in enumerate(rows) if keys[0] in r and keys[1] in r]
    if not pairs:
        raise DataError(f"no step of {config.metrics} holds both {keys[0]!r} and {keys[1]!r}")
    entropy, performance = (np.array(v) for v in zip(*pairs))
    fit = fit_entropy_law(entropy, performance)
    summary: dict[str, Any] = {
        "metrics": str(config.metrics), "entropy_key": keys[0], "performance_key": keys[1], "points": fit.n,
        "a": fit.a, "b": fit.b, "r2": fit.r2, "rmse": fit.rmse, "ceiling": fit.ceiling,
    }
    n_fit = 0
    try:
        ext = extrapolate_entropy_law(entropy, performance, fit_fraction=config.fit_fraction)
    except DataError as exc:
        summary["extrapolation"] = f"skipped: {exc}"
    else:
        n_fit = ext.n_fit
        summary["extrapolation"] = {
            "fit_points": ext.n_fit, "predicted_points": ext.n_predicted, "a": ext.fit.a, "b": ext.fit.b,
            "rmse": ext.rmse, "max_error": ext.max_error, "final_error": ext.final_error,
        }
    _plots.law_plot(run_dir / "law.png", entropy, performance, fit, n_fit=n_fit, performance_name=keys[1])
    summary["plot"] = str(run_dir / "law.png")
    (run_dir / "report.md").write_text(_report(summary))
    return summary


def _number(row: dict[str, Any], key: str, index: int) -> float:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"metrics row {index} (step {row.get('step', '?')}) has {key!r} = {value!r}; expected a number")
    return float(value)


def _report(s: dict[str, Any]) -> str:
    lines = [
        "# Entropy-performance law", "",
        f"Run: `{s['metrics']}`; H = `{s['entropy_key']}`, R = `{s['performance_key']}`, {s['points']} points.", "",
        "| a | b | R² | RMSE | ceiling b - a |", "|---|---|---|---|---|",
        f"| {s['a']:.4g} | {s['b']:.4g} | {s['r2']:.3f} | {s['rmse']:.4g} | {s['ceiling']:.4g} |", "",
    ]
    ext = s["extrapolation"]
    if isinstance(ext, dict):
        lines += [
            f"Fitted on the first {ext['fit_points']} points, predicting the other {ext['predicted_points']}: "
            f"RMSE {ext['rmse']:.4g}, max error {ext['max_error']:.4g}, error at the last point {ext['final_error']:.4g}.",
            "",
        ]
    else:
        lines += [f"Extrapolation {ext}.", ""]
    lines += ["![law](law.png)", ""]
    return "\n".join(lines)
