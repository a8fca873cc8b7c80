"""The recipes at a tiny size through klcore's recipe runner (what `klcore run` calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from divergence_rl import PresampleConfig
from divergence_rl.recipes import DPHToyConfig

from klcore.errors import ConfigError
from klcore.recipes import run_recipe

BASE = ["base.warmup_steps=150", "base.model_size=tiny", "base.task_options={digits=1}",
        "base.ood_task_options={digits=1}"]
SAMPLING = ["presample.num_prompts=12", "presample.samples=4", "presample.min_correct=1",
            "presample.extra_sample=false", "presample.chunk_size=5"]


def test_dph_toy_tiny(plugins, tmp_path: Path) -> None:
    overrides = [*BASE, *SAMPLING, "trainer.steps=2", "trainer.prompts_per_step=2", "trainer.group_size=4",
                 "eval_problems=5", "eval_samples=2", "ks=[1,2]", "rehearsal_batch=4", "divergence_every=1",
                 "seeds=[0,1]", 'methods=["base","grpo","dph_js"]', "eta_scales=[1,10]"]
    summary = run_recipe(plugins, "dph-toy", out=tmp_path, overrides=overrides)
    variants = summary["experiment"]["variants"]
    assert set(variants) == {"base", "grpo", "dph_js-x1", "dph_js-x10"}
    assert summary["held_out_problems"] == 5
    for name in ("summary.json", "store/manifest.json", "base_model/config.json", "experiment/report.md",
                 "experiment/summary.json", "experiment/figures/reward_mean.png", "experiment/figures/rehearsal_js.png",
                 "experiment/dph_js-x10/seed-1/result.json"):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "experiment" / "report.md").read_text()
    assert all(f"| {v} |" in report for v in variants) and "±" in report
    run_config = json.loads((tmp_path / "experiment" / "dph_js-x10" / "seed-0" / "config.json").read_text())
    assert run_config["regularisers"]["dph"]["eta"] == pytest.approx(4.0)  # eta_js 0.4 x 10
    for stats in variants.values():
        assert stats["test_pass@1"]["n"] == 2
        for key in ("test_pass@2", "train_pass@1", "rehearsal_set_pass@2", "exploration_set_pass@1"):
            assert all(0.0 <= v <= 1.0 for v in stats[key]["values"])
    assert variants["base"]["rehearsal/js"]["mean"] == 0.0 and variants["grpo"]["rehearsal/js"]["mean"] > 0
    # resumable: a second call loads every finished run instead of training again
    (tmp_path / "experiment" / "grpo" / "seed-1" / "result.json").unlink()
    again = run_recipe(plugins, "dph-toy", out=tmp_path, overrides=overrides)
    assert again["experiment"]["variants"]["dph_js-x1"] == variants["dph_js-x1"]


def test_presample_command_resumes(plugins, tmp_path: Path) -> None:
    first = run_recipe(plugins, "dph-presample", out=tmp_path, overrides=[*BASE, *SAMPLING])
    assert (first["shards_written"], first["shards_skipped"]) == (3, 0)
    (tmp_path / "store" / "shard-00002.safetensors").unlink()  # as if killed before the last shard
    again = run_recipe(plugins, "dph-presample", out=tmp_path, overrides=[*BASE, *SAMPLING])
    assert (again["shards_written"], again["shards_skipped"]) == (1, 2)
    assert again["rehearsal_prompts"] == first["rehearsal_prompts"]


@pytest.mark.parametrize("kw", [dict(methods=["grpo", "ppo"]), dict(methods=[]), dict(seeds=[]), dict(ks=[1, 64]),
                                dict(eta_js=-1.0), dict(presample=PresampleConfig(temperature=0.5)),
                                dict(eta_scales=[]), dict(eta_scales=[0]), dict(weighting="sum")])
def test_bad_toy_config(kw) -> None:
    with pytest.raises(ConfigError):
        DPHToyConfig(**kw)
