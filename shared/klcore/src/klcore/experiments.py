"""Named variants x seeds: resumable runs, mean and 95% intervals over seeds, a report with figures.

``run_experiment(run, variants, seeds, out)`` calls ``run(variant, options, seed, run_dir)`` once per
variant and seed, each in its own folder, and aggregates every returned metric over the seeds::

    OUT/<variant>/seed-<seed>/result.json   the run's final metrics (written when ``run`` returns)
    OUT/<variant>/seed-<seed>/metrics.jsonl curves, if the run writes them (klcore trainers do)
    OUT/summary.json                        per variant and metric: n, mean, std, interval, values
    OUT/report.md                           one row per variant: mean ± half-width, then the figures
    OUT/figures/<metric>.png                mean curve over seeds with a 95% band, one line per variant

A run whose ``result.json`` exists is loaded, not run again, so an interrupted experiment resumes
where it stopped. Intervals are Student t: mean ± t_{(1+c)/2, n-1} std / sqrt(n), with the sample
std (ddof=1). It is meant to be called in one process (call it on rank 0 only, or launch the
distributed runs from inside ``run``). Needs ``klcore[experiments]`` (scipy, matplotlib).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klcore.errors import ConfigError, DataError, UnknownNameError

RunFn = Callable[[str, dict[str, Any], int, Path], Mapping[str, float]]

RESULT_FILE = "result.json"
CURVES_FILE = "metrics.jsonl"
FIGURES_DIR = "figures"
MAX_DEFAULT_FIGURES = 12
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided Student t interval ``[low, high] = mean ± half_width``.

    ``std`` is the sample std (ddof=1). With ``n == 1`` ``std``, ``half_width``, ``low`` and ``high``
    are NaN; a non-finite value makes the statistics it enters NaN or infinite.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    half_width: float


@functools.lru_cache(maxsize=256)
def _t_quantile(q: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, dof))


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and ``confidence`` interval (Student t, n - 1 degrees of freedom) of real numbers."""
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    given = list(values)
    bad = [x for x in given if not _is_real(x)]
    if not given or bad:
        raise DataError(f"mean_interval needs one or more real numbers, got {len(given)} values with {bad[:3]!r}")
    xs = [float(x) for x in given]
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(n, mean, math.nan, math.nan, math.nan, math.nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, half)


@dataclass(frozen=True)
class ExperimentResult:
    """What ``run_experiment`` wrote: its folder, the ``summary.json`` content and every run's metrics."""

    out: Path
    summary: dict[str, Any]
    runs: dict[tuple[str, int], dict[str, float]]

    def interval(self, variant: str, metric: str) -> tuple[float, float, float]:
        """``(mean, ci_low, ci_high)`` of ``metric`` over the seeds of ``variant`` (NaN where undefined)."""
        variants = self.summary["variants"]
        if variant not in variants:
            raise UnknownNameError(f"no variant {variant!r}; the experiment has {', '.join(variants)}")
        metrics = variants[variant]
        if metric not in metrics:
            raise UnknownNameError(f"variant {variant!r} has no metric {metric!r}; it has {', '.join(metrics)}")
        mean, low, high = (
            math.nan if metrics[metric][k] is None else metrics[metric][k] for k in ("mean", "ci_low", "ci_high")
        )
        return mean, low, high


def run_experiment(
    run: RunFn,
    variants: Mapping[str, Mapping[str, Any]] | Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike[str],
    *,
    title: str = "",
    figure_metrics: Sequence[str] | None = None,
) -> ExperimentResult:
    """Run (or load) every variant x seed, then write ``summary.json``, ``report.md`` and figures.

    ``variants`` maps a name to the options passed to ``run`` (a sequence of names gets ``{}``);
    names must be safe folder names. ``figure_metrics`` defaults to the numeric curve metrics that
    every run with a ``metrics.jsonl`` logs (sorted, at most ``MAX_DEFAULT_FIGURES``).
    """
    plan = _variants(variants)
    seed_list = _seeds(seeds)
    root = Path(out)
    runs: dict[tuple[str, int], dict[str, float]] = {}
    for variant, options in plan.items():
        for seed in seed_list:
            runs[variant, seed] = _run_once(run, variant, dict(options), seed, root / variant / f"seed-{seed}")
    summary = {
        "title": title,
        "seeds": seed_list,
        "variants": {v: _aggregate([runs[v, s] for s in seed_list]) for v in plan},
    }
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / "summary.json", json.dumps(_nulls(summary), indent=2, allow_nan=False) + "\n")
    figures = _figures(root, plan, seed_list, figure_metrics)
    _atomic_write(root / "report.md", _report(summary, figures))
    return ExperimentResult(root, _nulls(summary), runs)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _variants(variants: Mapping[str, Mapping[str, Any]] | Sequence[str]) -> dict[str, Mapping[str, Any]]:
    if isinstance(variants, Mapping):
        plan = dict(variants)
    elif isinstance(variants, Sequence) and not isinstance(variants, str):
        plan = {name: {} for name in variants}
        if len(plan) != len(variants):
            raise ConfigError(f"variants must be distinct names, got {list(variants)!r}")
    else:
        raise ConfigError(f"variants must be a mapping name -> options or a list of names, got {variants!r}")
    if not plan:
        raise ConfigError("variants is empty; give at least one variant name")
    for name, options in plan.items():
        if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name == FIGURES_DIR:
            raise ConfigError(
                f"variant name {name!r} is not a safe folder name: use letters, digits, '.', '_' and '-', "
                f"starting with a letter or digit (and not {FIGURES_DIR!r})"
            )
        if not isinstance(options, Mapping):
            raise ConfigError(f"options of variant {name!r} must be a mapping, got {type(options).__name__}")
    return plan


def _seeds(seeds: Sequence[int]) -> list[int]:
    seed_list = list(seeds)
    if not seed_list:
        raise ConfigError("seeds is empty; give at least one seed")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seed_list):
        raise ConfigError(f"seeds must be non-negative integers, got {seed_list!r}")
    if len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"seeds must be distinct, got {seed_list!r}")
    return seed_list


def _run_once(run: RunFn, variant: str, options: dict[str, Any], seed: int, run_dir: Path) -> dict[str, float]:
    """Load ``run_dir/result.json`` or call ``run`` and write it; metrics as floats in their order."""
    result = run_dir / RESULT_FILE
    if result.exists():
        try:
            stored = json.loads(result.read_text())["metrics"]
            return {str(k): float(v) for k, v in stored.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{result} is not a klcore result file ({exc}); delete it to redo that run") from exc
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        metrics = run(variant, options, seed, run_dir)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"raised by the run of variant {variant!r} with seed {seed} in {run_dir}")
        raise
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) and _is_real(v) for k, v in metrics.items()):
        raise DataError(
            f"the run of variant {variant!r} with seed {seed} must return a mapping of metric name (str) to "
            f"a real number, got {metrics!r}"
        )
    values = {k: float(v) for k, v in metrics.items()}
    # Non-finite values are stored as "nan" / "inf" / "-inf" strings: strict JSON, read back by float().
    record = {
        "variant": variant,
        "seed": seed,
        "metrics": {k: v if math.isfinite(v) else str(v) for k, v in values.items()},
    }
    _atomic_write(result, json.dumps(record, indent=2) + "\n")
    return values


def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric (in first-seen order) the interval over the seeds that report it."""
    names = list(dict.fromkeys(k for metrics in per_seed for k in metrics))
    out = {}
    for name in names:
        values = [m[name] for m in per_seed if name in m]
        ci = mean_interval(values)
        out[name] = {
            "n": ci.n,
            "mean": ci.mean,
            "std": ci.std,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "half_width": ci.half_width,
            "values": values,
        }
    return out


def _nulls(obj: Any) -> Any:
    """A copy of a JSON-like tree with every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {k: _nulls(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nulls(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_curves(path: Path) -> dict[str, dict[int, float]]:
    """``metrics.jsonl`` as metric -> {step: value} (numeric values only; a repeated step keeps the last)."""
    curves: dict[str, dict[int, float]] = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"line {i} of {path} is not a JSON object with a 'step' key: {line[:200]!r}") from exc
        for key, value in record.items():
            if key != "step" and _is_real(value):
                curves.setdefault(key, {})[step] = float(value)
    return curves


def _figures(
    root: Path, plan: Mapping[str, Any], seeds: list[int], figure_metrics: Sequence[str] | None
) -> dict[str, str]:
    """Write one PNG per curve metric; return metric -> path relative to ``root``."""
    curves = {
        (v, s): _read_curves(path)
        for v in plan
        for s in seeds
        if (path := root / v / f"seed-{s}" / CURVES_FILE).is_file()
    }
    logged = set().union(*(c.keys() for c in curves.values()))
    if figure_metrics is None:
        common = set.intersection(*(set(c) for c in curves.values())) if curves else set()
        metrics = sorted(common)[:MAX_DEFAULT_FIGURES]
    else:
        metrics = list(figure_metrics)
        missing = [m for m in metrics if m not in logged]
        if missing:
            raise ConfigError(
                f"figure_metrics {missing!r} appear in no run's {CURVES_FILE}; logged: {', '.join(sorted(logged))}"
            )
    files = {m: f"{FIGURES_DIR}/{m.replace('/', '_')}.png" for m in metrics}
    if len(set(files.values())) != len(files):
        raise ConfigError(f"figure_metrics {metrics!r} map to the same file name once '/' is replaced by '_'")
    for metric, rel in files.items():
        bands = {}
        for v in plan:
            per_seed = [curves[v, s][metric] for s in seeds if metric in curves.get((v, s), {})]
            steps = sorted(set().union(*per_seed))
            if steps:
                bands[v] = (steps, [mean_interval([c[t] for c in per_seed if t in c]) for t in steps])
        _plot(root / rel, metric, bands)
    return files


def _plot(path: Path, metric: str, bands: Mapping[str, tuple[list[int], list[Interval]]]) -> None:
    """Mean over seeds per step with a shaded interval (none where one seed has the step)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch in the caller's session
    ax = fig.add_subplot()
    for variant, (steps, cis) in bands.items():
        (line,) = ax.plot(steps, [c.mean for c in cis], label=variant)
        ax.fill_between(steps, [c.low for c in cis], [c.high for c in cis], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} (mean, 95% interval over seeds)")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _cell(stats: Mapping[str, Any] | None) -> str:
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.3g} (n=1)"
    return f"{stats['mean']:.3g} ± {stats['half_width']:.3g}"


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _report(summary: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    variants: dict[str, dict[str, Any]] = summary["variants"]
    seeds = summary["seeds"]
    metrics = list(dict.fromkeys(m for stats in variants.values() for m in stats))
    lines = [
        f"# {summary['title'] or 'Experiment'}",
        "",
        f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}). Each cell is the mean over seeds ± the half-width "
        "of its 95% interval (Student t, sample std).",
        "",
        _row(["variant", *metrics]),
        _row(["---"] * (len(metrics) + 1)),
    ]
    lines += [_row([v, *(_cell(stats.get(m)) for m in metrics)]) for v, stats in variants.items()]
    non_finite = [
        f"{v} / {m}"
        for v, stats in variants.items()
        for m, s in stats.items()
        if not all(map(math.isfinite, s["values"]))
    ]
    if non_finite:
        lines += ["", f"Non-finite values (NaN or inf) in: {', '.join(non_finite)}; their statistics are not finite."]
    if figures:
        lines += ["", "## Figures"]
        lines += [line for m, rel in figures.items() for line in ("", f"![{m}]({rel})")]
    return "\n".join(lines) + "\n"


__all__ = [
    "MAX_DEFAULT_FIGURES",
    "ExperimentResult",
    "Interval",
    "mean_interval",
    "run_experiment",
]
