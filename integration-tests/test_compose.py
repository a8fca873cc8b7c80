"""Two separately installed plugin distributions compose in one CLI run: a loss from one, a
regulariser from the other, each logging under its own metric names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LOSS_PLUGIN = '''
from klcore import Component, hookimpl
from klcore.losses import ppo_clip_loss


def scaled_ppo(old_log_prob, log_prob, advantages, mask, *, scale=1.0, **agg):
    loss, metrics = ppo_clip_loss(old_log_prob, log_prob, advantages, mask, **agg)
    metrics["scaled/scale"] = loss.new_tensor(scale)
    return scale * loss, metrics


@hookimpl
def klcore_register_losses():
    return [Component("scaled_ppo", scaled_ppo, help="PPO-clip times a constant")]
'''

REG_PLUGIN = '''
from klcore import Component, hookimpl
from klcore.reduce import aggregate


class EntropyBonus:
    def __init__(self, weight=0.01):
        self.weight = weight

    @hookimpl
    def klcore_extra_loss(self, batch, outputs, counts):
        # a differentiable surrogate: mean log-prob of taken tokens (minimising it raises entropy)
        term = aggregate(outputs["log_prob"], batch["response_mask"], "token-mean", counts=counts)
        return {"bonus/term": self.weight * term}


@hookimpl
def klcore_register_regularisers():
    return [Component("bonus", EntropyBonus, help="log-prob penalty")]
'''


def _dist(root: Path, name: str, module: str, code: str) -> Path:
    src = root / name
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text(code)
    (src / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        f'[project]\nname = "{name}"\nversion = "0.0.1"\n'
        f'[project.entry-points.klcore]\n{module} = "{module}"\n'
        f'[tool.hatch.build.targets.wheel]\npackages = ["{module}"]\n'
    )
    return src


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    target = tmp_path_factory.mktemp("site")
    for src in (_dist(root, "klcore-testloss", "testloss", LOSS_PLUGIN), _dist(root, "klcore-testreg", "testreg", REG_PLUGIN)):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], check=True)
    return target


def test_loss_and_regulariser_from_two_distributions(site: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(site), "KLCORE_DISABLE_PLUGIN_AUTOLOAD": ""}
    listing = subprocess.run([sys.executable, "-m", "klcore.cli", "plugins"], env=env, capture_output=True, text=True,
                             check=True).stdout
    assert "testloss  (klcore-testloss)" in listing and "testreg  (klcore-testreg)" in listing
    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "klcore.cli", "run", "grpo-toy", "--out", str(out),
         "--set", "model_size=tiny", "--set", "warmup_steps=2", "--set", "trainer.steps=2",
         "--set", "trainer.prompts_per_step=2", "--set", "trainer.group_size=2", "--set", "trainer.eval_problems=4",
         "--set", "trainer.progress=false", "--set", "trainer.loss=scaled_ppo",
         "--set", "trainer.loss_options={scale = 2.0}", "--set", "trainer.regularisers={bonus = {weight = 0.5}}"],
        env=env, check=True, capture_output=True, text=True,
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["scaled/scale"] == 2.0
        assert r["bonus/term"] < 0
        assert r["loss/total"] == pytest.approx(r["loss/objective"] + r["bonus/term"], rel=1e-5, abs=1e-6)
