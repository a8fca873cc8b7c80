"""Recipe ``entropy-law``: fit R = -a exp(H) + b to a run's metrics; PNG plot, markdown report, JSON summary."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entropy_rl import _plots
from entropy_rl._metrics_file import read_metrics
from entropy_rl.law import MIN_R2, extrapolate_entropy_law, fit_entropy_law_joint
from klcore.errors import ConfigError, DataError


@dataclass
class EntropyLawConfig:
    """``metrics``: a run folder or its ``metrics.jsonl``, or several separated by commas (one (a, b) is
    fitted jointly over all their points); the series are the steps holding both keys.
    ``performance_key``: ``heldout`` (default: the run's one ``eval/<task>_accuracy``), ``reward``
    (``reward/mean``, training reward) or a metric name.

    ``fit_fraction``: share of the run (first points) used for the extrapolation check. A fit with
    ``a <= 0`` or R² below ``min_r2`` is reported as "no law" and gets no ceiling.
    """

    metrics: str = ""
    entropy_key: str = "entropy/mean"
    performance_key: str = "heldout"
    fit_fraction: float = 0.15
    min_r2: float = MIN_R2

    def __post_init__(self) -> None:
        if not 0 < self.fit_fraction < 1:
            raise ConfigError(f"fit_fraction must be in (0, 1), got {self.fit_fraction!r}")
        if not 0 <= self.min_r2 <= 1:
            raise ConfigError(f"min_r2 must be in [0, 1], got {self.min_r2!r}")
        if not self.entropy_key or not self.performance_key:
            raise ConfigError("entropy_key and performance_key must name metrics")


def _performance_key(requested: str, rows: list[dict[str, Any]], source: str) -> str:
    """``heldout``: the run's one ``eval/<task>_accuracy`` key; ``reward``: ``reward/mean``; else the key itself."""
    if requested == "reward":
        return "reward/mean"
    if requested != "heldout":
        return requested
    found = sorted({k for r in rows for k in r if re.fullmatch(r"eval/.+_accuracy", k)})
    if len(found) != 1:
        raise DataError(
            f"{source}: performance_key=heldout needs exactly one eval/<task>_accuracy metric, found {found}; "
            "name one (--set performance_key=eval/NAME_accuracy) or fit training reward (--set performance_key=reward)"
        )
    return found[0]


def _series(source: str, config: EntropyLawConfig) -> tuple[np.ndarray, np.ndarray, str]:
    rows = read_metrics(source)
    keys = (config.entropy_key, _performance_key(config.performance_key, rows, source))
    pairs = [(_number(r, keys[0], i), _number(r, keys[1], i)) for i, r in enumerate(rows) if keys[0] in r and keys[1] in r]
    if not pairs:
        raise DataError(f"no step of {source} holds both {keys[0]!r} and {keys[1]!r}")
    entropy, performance = (np.array(v) for v in zip(*pairs))
    return entropy, performance, keys[1]


def run(config: EntropyLawConfig, run_dir: Path) -> dict[str, Any]:
    sources = [p.strip() for p in config.metrics.split(",") if p.strip()]
    if not sources:
        raise ConfigError("pass the run(s) to fit: klcore run entropy-law --set metrics=RUN_DIR[,RUN_DIR...]")
    series = [_series(src, config) for src in sources]
    fit = fit_entropy_law_joint([(h, r) for h, r, _ in series])
    entropy = np.concatenate([h for h, _, _ in series])
    performance = np.concatenate([r for _, r, _ in series])
    performance_keys = sorted({k for _, _, k in series})
    summary: dict[str, Any] = {
        "metrics": sources, "entropy_key": config.entropy_key, "performance_key": ", ".join(performance_keys),
        "points": fit.n, "a": fit.a, "b": fit.b, "r2": fit.r2, "rmse": fit.rmse, "min_r2": config.min_r2,
        "law": fit.holds(config.min_r2), "ceiling": fit.ceiling if fit.holds(config.min_r2) else None,
    }
    n_fit = 0
    if len(series) > 1:
        summary["extrapolation"] = f"skipped: {len(series)} runs fitted jointly (the extrapolation check is per run)"
    else:
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
    _plots.law_plot(
        run_dir / "law.png", entropy, performance, fit, n_fit=n_fit, performance_name=summary["performance_key"],
        holds=summary["law"],
    )
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
        f"Run(s): {', '.join(f'`{m}`' for m in s['metrics'])}; H = `{s['entropy_key']}`, R = `{s['performance_key']}`, {s['points']} points.", "",
    ]
    if s["law"]:
        lines += [
            "| a | b | R² | RMSE | ceiling b - a |", "|---|---|---|---|---|",
            f"| {s['a']:.4g} | {s['b']:.4g} | {s['r2']:.3f} | {s['rmse']:.4g} | {s['ceiling']:.4g} |", "",
        ]
    else:
        lines += [
            f"**No law**: the least-squares fit has a = {s['a']:.4g} and R² = {s['r2']:.3f} (a law needs a > 0 and "
            f"R² >= {s['min_r2']:g}); no ceiling is predicted.", "",
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
