"""The hypo-toy recipe at a tiny size through the registry (the CLI's path) and klcore.experiments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypo.toy_recipe import distinct_problems, paired_differences

from klcore.errors import ConfigError
from klcore.recipes import run_recipe
from klcore.toy import get_task

TINY = [
    "model_size=tiny", "warmup_steps=5", "offline_prompts=8", "reference_samples=2", "eval_prompts=6",
    "seeds=[0, 1]", "trainer.steps=2", "trainer.pairs_per_step=4", "trainer.group_size=2", "trainer.eval_every=1",
    "trainer.eval_samples=2", "trainer.progress=false",
]


def test_hypo_toy_tiny(tmp_path: Path, plugins) -> None:  # type: ignore[no-untyped-def]
    summary = run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=TINY)
    exp = tmp_path / "experiment"
    for name in ("summary.json", "report.md", "figures/eval_reward.png", "figures/eval_reverse_kl.png"):
        assert (exp / name).is_file(), name
    for seed in (0, 1):
        assert (tmp_path / "references" / f"seed-{seed}.pt").is_file()
        for variant in ("dpo", "hypo"):
            assert (exp / variant / f"seed-{seed}" / "metrics.jsonl").is_file()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    dpo, hypo = (summary["experiment"]["variants"][v] for v in ("dpo", "hypo"))
    # both variants of a seed start from the same reference and evaluate the same prompts with the same seed
    assert dpo["reward_start"]["values"] == hypo["reward_start"]["values"]
    assert dpo["reference_greedy_pass@1"]["values"] == hypo["reference_greedy_pass@1"]["values"]
    curves = [json.loads(line) for line in (exp / "hypo" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert curves[0]["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    assert "kl/online" in curves[0]
    assert "kl/online" not in json.loads((exp / "dpo" / "seed-0" / "metrics.jsonl").read_text().splitlines()[0])
    diff = summary["paired_differences"]["reward_final"]
    expected = [h - d for h, d in zip(hypo["reward_final"]["values"], dpo["reward_final"]["values"], strict=True)]
    assert diff["values"] == pytest.approx(expected)
    assert "| hypo |" in (exp / "report.md").read_text() and "hypo - dpo" in (exp / "report.md").read_text()
    # a second call resumes: every run is loaded, nothing changes
    assert run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=TINY)["experiment"] == summary["experiment"]


def test_paired_differences_interval() -> None:
    runs = {("dpo", s): {"reward_final": 0.1 * s, "reverse_kl_final": 1.0} for s in range(3)}
    runs |= {("hypo", s): {"reward_final": 0.1 * s + d, "reverse_kl_final": 0.5} for s, d in enumerate([0.1, 0.2, 0.3])}
    out = paired_differences(runs, [0, 1, 2])
    # mean 0.2, sample std 0.1, t_{0.975, 2} = 4.302653
    half = 4.302653 * 0.1 / 3**0.5
    assert out["reward_final"]["mean"] == pytest.approx(0.2)
    assert out["reward_final"]["ci_low"] == pytest.approx(0.2 - half, rel=1e-5)
    assert out["reverse_kl_final"]["values"] == [-0.5, -0.5, -0.5]


def test_distinct_problems() -> None:
    task = get_task("addition", digits=1)
    problems = distinct_problems(task, 10, split="train", seed=0)
    assert len({p.prompt for p in problems}) == 10
    with pytest.raises(ConfigError, match="distinct"):
        distinct_problems(task, 100, split="test", seed=0)


def test_hypo_toy_rejects_bad_config(tmp_path: Path, plugins) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="kl_coef"):
        run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=[*TINY, "trainer.kl_coef=0.0"])
    with pytest.raises(ConfigError, match="offline_prompts"):
        run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=[*TINY, "offline_prompts=2"])
    with pytest.raises(ConfigError, match="distinct"):
        run_recipe(plugins, "hypo-toy", out=tmp_path, overrides=[*TINY, "seeds=[1, 1]"])
