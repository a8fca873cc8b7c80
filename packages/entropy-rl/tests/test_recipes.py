"""Recipes at a tiny size: entropy-law through the CLI entry point, entropy-toy end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from klcore.cli import main as klcore_main
from klcore.errors import ConfigError, DataError
from klcore.recipes import run_recipe


def _synthetic_run(path: Path, a: float = 0.3, b: float = 0.9, n: int = 60) -> None:
    rng = np.random.default_rng(0)
    h = np.linspace(1.3, 0.2, n)
    rows = [{"step": i, "entropy/mean": float(x), "reward/mean": float(-a * np.exp(x) + b + rng.normal(0, 0.003))}
            for i, x in enumerate(h)]
    rows.insert(3, {"step": 99, "loss/total": 0.1})  # a row without the keys is skipped
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_entropy_law_recipe_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _synthetic_run(tmp_path / "run")
    out = tmp_path / "law"
    monkeypatch.setenv("KLCORE_DISABLE_PLUGIN_AUTOLOAD", "0")
    argv = ["run", "entropy-law", "--set", f"metrics={tmp_path / 'run'}", "--set", "performance_key=reward"]
    assert klcore_main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["points"] == 60
    assert summary["a"] == pytest.approx(0.3, abs=0.02) and summary["b"] == pytest.approx(0.9, abs=0.03)
    assert summary["law"] is True and summary["ceiling"] == pytest.approx(summary["b"] - summary["a"])
    assert summary["extrapolation"]["fit_points"] == 9 and summary["extrapolation"]["rmse"] < 0.05
    assert (out / "law.png").stat().st_size > 1000 and "ceiling" in (out / "report.md").read_text()


def test_entropy_law_recipe_reports_no_law_for_an_inverted_or_weak_fit(tmp_path: Path, plugins) -> None:
    h = np.linspace(1.2, 0.2, 30)
    noise = np.random.default_rng(0).normal(0, 0.05, h.size)
    for name, reward in (("inverted", 0.2 * np.exp(h) + 0.1), ("weak", 0.5 + noise)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": i, "entropy/mean": float(x), "reward/mean": float(r)} for i, (x, r) in enumerate(zip(h, reward))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / f"law-{name}"
        run_recipe(plugins, "entropy-law", out=out, overrides=[f"metrics={run}", "performance_key=reward"])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["law"] is False and summary["ceiling"] is None
        assert (summary["a"] < 0) if name == "inverted" else (summary["r2"] < 0.5)
        report = (out / "report.md").read_text()
        assert "No law" in report and "ceiling b - a |" not in report


def test_entropy_law_recipe_fits_held_out_accuracy_jointly_across_runs(tmp_path: Path, plugins) -> None:
    a, b = 0.25, 0.8
    runs, points = [], []
    for k, (h0, h1) in enumerate(((1.4, 0.6), (1.0, 0.3))):  # two methods, one model and task: one law
        h = np.linspace(h0, h1, 10)
        acc = -a * np.exp(h) + b + np.random.default_rng(k).normal(0, 0.002, h.size)
        rows = []
        for i, (x, y) in enumerate(zip(h, acc)):
            rows.append({"step": 2 * i, "entropy/mean": float(x), "reward/mean": 0.5, "eval/add_accuracy": float(y)})
            rows.append({"step": 2 * i + 1, "entropy/mean": float(x), "reward/mean": 0.1})  # no evaluation here
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(run))
        points.append((h, acc))
    out = tmp_path / "joint"
    summary = run_recipe(plugins, "entropy-law", out=out, overrides=[f"metrics={','.join(runs)}"])
    assert summary["performance_key"] == "eval/add_accuracy" and summary["points"] == 20
    x = np.exp(np.concatenate([p[0] for p in points]))
    slope, intercept = np.polyfit(x, np.concatenate([p[1] for p in points]), 1)  # independent least squares
    assert summary["a"] == pytest.approx(-slope, rel=1e-6) and summary["b"] == pytest.approx(intercept, rel=1e-6)
    assert summary["law"] is True and summary["ceiling"] == pytest.approx(intercept + slope)
    assert "jointly" in summary["extrapolation"]
    # training reward by option (constant 0.5 at eval steps plus 0.1 elsewhere: no law)
    reward = run_recipe(plugins, "entropy-law", out=tmp_path / "r", overrides=[f"metrics={runs[0]}", "performance_key=reward"])
    assert reward["performance_key"] == "reward/mean" and reward["points"] == 20 and reward["ceiling"] is None
    # two eval metrics: held-out is ambiguous, say which to name
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "metrics.jsonl").write_text(
        json.dumps({"entropy/mean": 1.0, "eval/a_accuracy": 0.1, "eval/b_accuracy": 0.2}) + "\n"
    )
    with pytest.raises(DataError, match="exactly one eval"):
        run_recipe(plugins, "entropy-law", out=tmp_path / "t", overrides=[f"metrics={tmp_path / 'two'}"])


def test_entropy_law_recipe_bad_input(tmp_path: Path, plugins) -> None:
    with pytest.raises(ConfigError, match="metrics="):
        run_recipe(plugins, "entropy-law", out=tmp_path / "a")
    with pytest.raises(DataError, match="does not exist"):
        run_recipe(plugins, "entropy-law", out=tmp_path / "b", overrides=[f"metrics={tmp_path / 'nope'}"])
    _synthetic_run(tmp_path / "run")
    with pytest.raises(DataError, match="eval/x"):
        run_recipe(plugins, "entropy-law", out=tmp_path / "c",
                   overrides=[f"metrics={tmp_path / 'run'}", "performance_key=eval/x"])
    with pytest.raises(ConfigError, match="fit_fraction"):
        run_recipe(plugins, "entropy-law", out=tmp_path / "d", overrides=["fit_fraction=1.5"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "entropy/mean": 1.0 - 0.1 * i, "reward/mean": None if i == 2 else 0.1 * i}) + "\n"
                for i in range(5))
    )
    with pytest.raises(DataError, match=r"step 2.*reward/mean"):
        run_recipe(plugins, "entropy-law", out=tmp_path / "e", overrides=[f"metrics={bad}", "performance_key=reward"])


@pytest.mark.slow
def test_entropy_toy_recipe_tiny(tmp_path: Path, plugins) -> None:
    overrides = [
        "model_size=tiny", "warmup_steps=3", "warmup_batch_size=8", "probe_states=16", "task_options.digits=1",
        "trainer.steps=2", "trainer.prompts_per_step=4", "trainer.group_size=4", "trainer.mini_batches=2",
        "trainer.eval_problems=8", "trainer.progress=false",
    ]
    summary = run_recipe(plugins, "entropy-toy", out=tmp_path, overrides=overrides)
    assert set(summary["methods"]) == {"grpo", "clip_cov", "kl_cov"}
    for name, m in summary["methods"].items():
        assert np.isfinite(m["entropy_end"]) and 0 <= m["reward_end"] <= 1, name
        assert (tmp_path / name / "metrics.jsonl").exists()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert all("dynamics/predicted_change" in r and "dynamics/actual_change" in r for r in rows)
    # the same warm-up checkpoint and seeds: the first rollout (before any update) is identical for every method
    first = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in summary["methods"]}
    assert len({(r["reward/mean"], r["entropy/mean"]) for r in first.values()}) == 1
    assert summary["methods"]["kl_cov"]["selected_frac"] > 0  # at least one token per mini-batch
    assert summary["methods"]["grpo"]["selected_frac"] is None  # PPO-clip selects nothing
    assert (tmp_path / "report.png").stat().st_size > 1000 and (tmp_path / "warmup.safetensors").exists()
    assert "| kl_cov |" in (tmp_path / "report.md").read_text()


def test_entropy_toy_config_checks(tmp_path: Path, plugins) -> None:
    with pytest.raises(ConfigError, match="methods"):
        run_recipe(plugins, "entropy-toy", out=tmp_path, overrides=["methods=['ppo']"])
    with pytest.raises(ConfigError, match="mini_batches"):
        run_recipe(plugins, "entropy-toy", out=tmp_path, overrides=["trainer.mini_batches=1"])
