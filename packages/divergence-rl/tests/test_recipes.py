"""The recipes at a tiny size through klcore's recipe runner (what `klcore run` calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from divergence_rl import PresampleConfig
from divergence_rl.recipes import METHODS, DPHToyConfig

from klcore.errors import ConfigError
from klcore.recipes import run_recipe

BASE = ["base.warmup_steps=150", "base.model_size=tiny", "base.task_options={digits=1}",
        "base.ood_task_options={digits=1}"]
SAMPLING = ["presample.num_prompts=12", "presample.samples=4", "presample.min_correct=1",
            "presample.extra_sample=false", "presample.chunk_size=5"]


def test_dph_toy_tiny(plugins, tmp_path: Path) -> None:
    overrides = [*BASE, *SAMPLING, "trainer.steps=2", "trainer.prompts_per_step=2", "trainer.group_size=4",
                 "eval_every=1", "eval_problems=3", "eval_samples=2", "ks=[1,2]", "rehearsal_batch=4",
                 "divergence_every=1"]
    summary = run_recipe(plugins, "dph-toy", out=tmp_path, overrides=overrides)
    assert set(summary["methods"]) == {"base", *METHODS}
    for name in ("summary.json", "report.md", "pass_at_k.png", "rehearsal_divergence.png", "table.json",
                 "store/manifest.json", "base_model/config.json"):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {m} |" in report for m in METHODS)
    rows = [json.loads(x) for x in (tmp_path / "dph_js-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert "dph/loss" in rows[0] and "rehearsal/js" in rows[0] and "eval/ood_multiplication_pass_at_2" in rows[-1]
    grpo = [json.loads(x) for x in (tmp_path / "grpo-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert "dph/loss" not in grpo[0] and "rehearsal/forward_kl" in grpo[0]
    for row in summary["methods"].values():
        assert all(0.0 <= row[f"{d}_pass@{k}"] <= 1.0 for d in ("in", "ood") for k in (1, 2))


def test_presample_command_resumes(plugins, tmp_path: Path) -> None:
    first = run_recipe(plugins, "dph-presample", out=tmp_path, overrides=[*BASE, *SAMPLING])
    assert (first["shards_written"], first["shards_skipped"]) == (3, 0)
    (tmp_path / "store" / "shard-00002.safetensors").unlink()  # as if killed before the last shard
    again = run_recipe(plugins, "dph-presample", out=tmp_path, overrides=[*BASE, *SAMPLING])
    assert (again["shards_written"], again["shards_skipped"]) == (1, 2)
    assert again["rehearsal_prompts"] == first["rehearsal_prompts"]


@pytest.mark.parametrize("kw", [dict(methods=["grpo", "ppo"]), dict(methods=[]), dict(seeds=[]), dict(ks=[1, 64]),
                                dict(eta_js=-1.0), dict(presample=PresampleConfig(temperature=0.5))])
def test_bad_toy_config(kw) -> None:
    with pytest.raises(ConfigError):
        DPHToyConfig(**kw)
