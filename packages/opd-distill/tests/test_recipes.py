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


def test_paced_toy_recipe_tiny(tmp_path):
    overrides = [
        "teacher_warmup_steps=5", "student_warmup_steps=5", "student_hidden=16", "trainer.steps=2",
        "trainer.prompts_per_step=2", "trainer.group_size=2", "trainer.problem_pool=4", "trainer.eval_problems=4",
        "trainer.paced.samples=2", "trainer.progress=false", "variants=['fkl', 'paced_fkl_then_rkl']",
    ]
    summary = run_recipe(build_plugin_manager(), "paced-toy", out=tmp_path, overrides=overrides)
    assert {"summary.json", "report.md", "pass_at_1.png", "kl.png"} <= _files(tmp_path)
    assert {"fkl/pass@1", "paced_fkl_then_rkl/pass@1", "teacher/pass@1"} <= set(summary)
    history = [json.loads(x) for x in (tmp_path / "paced_fkl_then_rkl" / "metrics.jsonl").read_text().splitlines()]
    assert "paced/pool_pass_rate" in history[0]


def test_recipe_configs_reject_bad_values(tmp_path):
    plugins = build_plugin_manager()
    with pytest.raises(ConfigError):
        run_recipe(plugins, "opd-env-toy", out=tmp_path, overrides=["methods=['vanilla']"])
    with pytest.raises(ConfigError):
        run_recipe(plugins, "paced-toy", out=tmp_path, overrides=["variants=['soft']"])
    with pytest.raises(ConfigError):
        run_recipe(plugins, "paced-toy", out=tmp_path, overrides=["trainer.paced.alpha=-1"])
