"""The hypo-toy recipe at a tiny size through the registry (the CLI's path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klcore.errors import ConfigError
from klcore.recipes import run_recipe

TINY = [
    "model_size=tiny", "warmup_steps=5", "offline_prompts=8", "reference_samples=2", "eval_prompts=4",
    "trainer.steps=2", "trainer.pairs_per_step=4", "trainer.group_size=2", "trainer.eval_every=1",
    "trainer.eval_samples=2", "trainer.progress=false",
]


def test_hypo_toy_tiny(tmp_path: Path, plugins) -> None:  # type: ignore[no-untyped-def]
    summary = run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=TINY)
    for name in ("summary.json", "report.md", "curves.png", "histories.json", "seed0/dpo/metrics.jsonl",
                 "seed0/hypo/metrics.jsonl", "seed0/ref_logps.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    histories = json.loads((tmp_path / "histories.json").read_text())
    # both runs start from the same reference and evaluate the same prompts with the same seed
    assert histories["dpo"]["0"][0]["eval/reward"] == histories["hypo"]["0"][0]["eval/reward"]
    assert histories["dpo"]["0"][0]["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    assert "kl/online" in histories["hypo"]["0"][0] and "kl/online" not in histories["dpo"]["0"][0]
    assert set(summary) >= {"dpo", "hypo", "seeds"}
    assert "| hypo |" in (tmp_path / "report.md").read_text()


def test_hypo_toy_rejects_bad_config(tmp_path: Path, plugins) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="kl_coef"):
        run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=[*TINY, "trainer.kl_coef=0.0"])
    with pytest.raises(ConfigError, match="offline_prompts"):
        run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=[*TINY, "offline_prompts=2"])
