"""The two recipes at a tiny size through klcore's recipe runner (what `klcore run` calls)."""

from __future__ import annotations

import json

import pytest

from klcore.errors import ConfigError
from klcore.plugins import build_plugin_manager
from klcore.recipes import run_recipe


def _files(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_opd_env_toy_recipe_tiny(tmp_path):
    overrides = [
        "demos=1", "bc_steps=20", "trainer.steps=2", "trainer.tasks_per_step=2", "trainer.group_size=2",
        "trainer.eval_episodes=8", "trainer.progress=false", "methods=['opd_reinforce', 'hard_ce']",
    ]
    summary = run_recipe(build_plugin_manager(), "opd-env-toy", out=tmp_path, overrides=overrides)
    assert {"summary.json", "report.md", "success.png", "entropy.png"} <= _files(tmp_path)
    assert 0.0 <= summary["opd_reinforce/success"] <= 1.0 and 0.0 <= summary["teacher/success"] <= 1.0
    assert "hard CE" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["demos_used"] == 1


PACED_TINY = [
    "teacher_warmup_steps=5", "teacher_gate=0.0", "student_warmup_steps=5", "student_hidden=16", "student_layers=1",
    "trainer.steps=3", "trainer.warmup_steps=3", "trainer.prompts_per_step=2", "trainer.group_size=2",
    "trainer.problem_pool=6", "trainer.eval_problems=4", "trainer.eval_every=2", "trainer.paced.samples=2",
    "trainer.paced.every=2", "trainer.progress=false", "seeds=[0, 1]", "variants=['fkl', 'paced_fkl']",
]


def test_paced_toy_recipe_tiny(tmp_path):
    summary = run_recipe(build_plugin_manager(), "paced-toy", out=tmp_path, overrides=PACED_TINY)
    exp = tmp_path / "experiment"
    assert {"summary.json", "report.md", "pool_pass_rates.png", "figures"} <= _files(exp)
    assert "pool_pass_rates.png" in (exp / "report.md").read_text()
    variants = summary["experiment"]["variants"]
    assert set(variants) == {"fkl", "paced_fkl"}
    for name in ("pass@1_final", "teacher_pass@1", "pool_before/in_open_interval", "pool_after/rate_2of2"):
        assert variants["paced_fkl"][name]["n"] == 2, name
    # both variants start from the same student per seed: same initial pool pass rates
    assert variants["fkl"]["pool_before/rate_0of2"]["values"] == variants["paced_fkl"]["pool_before/rate_0of2"]["values"]
    rates = json.loads((exp / "paced_fkl" / "seed-0" / "pool_pass_rates.json").read_text())
    assert len(rates["before"]) == 6 and rates["samples"] == 2
    history = [json.loads(x) for x in (exp / "paced_fkl" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert "paced/pool_pass_rate" in history[0] and "paced/pool_pass_rate" in history[2]
    assert history[0]["optim/lr"] < history[-1]["optim/lr"] == pytest.approx(1e-3)  # LR warm-up


def test_paced_toy_teacher_gate(tmp_path):
    overrides = [o for o in PACED_TINY if not o.startswith("teacher_gate")] + ["teacher_gate=1.0"]
    with pytest.raises(ConfigError, match="teacher_gate"):
        run_recipe(build_plugin_manager(), "paced-toy", out=tmp_path, overrides=overrides)


def test_pass_rate_histogram():
    import torch
    from opd_distill.paced_recipe import pass_rate_histogram

    h = pass_rate_histogram(torch.tensor([0.0, 0.25, 0.25, 1.0]), 4)
    assert h == {"rate_0of4": 0.25, "rate_1of4": 0.5, "rate_2of4": 0.0, "rate_3of4": 0.0, "rate_4of4": 0.25,
                 "in_open_interval": 0.5}


def test_recipe_configs_reject_bad_values(tmp_path):
    plugins = build_plugin_manager()
    with pytest.raises(ConfigError):
        run_recipe(plugins, "opd-env-toy", out=tmp_path, overrides=["methods=['vanilla']"])
    with pytest.raises(ConfigError):
        run_recipe(plugins, "paced-toy", out=tmp_path, overrides=["variants=['soft']"])
    with pytest.raises(ConfigError):
        run_recipe(plugins, "paced-toy", out=tmp_path, overrides=["trainer.paced.alpha=-1"])
