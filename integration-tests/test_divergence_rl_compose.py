"""DPH-JS (divergence-rl's regulariser) composed with KL-Cov (entropy-rl's policy loss) in one GRPO run,
both looked up by name, each logging under its own metric names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("entropy_rl")
pytest.importorskip("divergence_rl")

from divergence_rl import ExplorationTask, PresampleConfig, load_rehearsal, presample

from klcore.plugins import build_plugin_manager
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer


class FirstCharEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def test_dph_js_with_kl_cov(tmp_path: Path) -> None:
    task, tok = FirstCharEven(digits=1), char_tokenizer()
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    cfg = PresampleConfig(num_prompts=16, samples=4, extra_sample=False, min_correct=2, chunk_size=8)
    presample(model, tok, task, cfg, tmp_path / "store")
    split = load_rehearsal(tmp_path / "store")
    plugins = build_plugin_manager(load_entrypoints=True)
    config = GRPOConfig(
        steps=3, lr=1e-2, prompts_per_step=4, group_size=4, progress=False, micro_batch_size=8,
        loss="kl_cov", regularisers={"dph": {"path": str(tmp_path / "store"), "kind": "js", "eta": 0.2,
                                             "batch_size": 6}},
    )
    trainer = GRPOTrainer(model, tok, ExplorationTask(task, tuple(split.exploration)), config,
                          run_dir=tmp_path / "run", plugins=plugins)
    assert trainer.loss_fn.__module__.startswith("entropy_rl")
    rows = trainer.train()
    assert rows[0]["dph/loss"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the initial one
    assert rows[-1]["dph/loss"] > 0
    for row in rows:
        assert torch.isfinite(torch.tensor(row["loss/total"]))
        assert row["loss/total"] == pytest.approx(row["loss/objective"] + row["dph/loss"], rel=1e-5, abs=1e-7)
    exploration = {p.prompt for p in split.exploration}
    assert all(p.prompt in exploration for p in trainer.task.problems(32, generator=torch.Generator().manual_seed(0)))
