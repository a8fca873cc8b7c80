"""The probe's running statistics (corr(cov, -dH), share of positive-covariance steps) survive a resume."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from entropy_rl import EntropyDynamics

from klcore.errors import CheckpointError
from klcore.hookspecs import hookimpl
from klcore.plugins import build_plugin_manager
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer
from klcore.trainer.run_folder import latest_checkpoint

HERE = Path(__file__).resolve().parent


class _StartsEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


class _Crash:
    @hookimpl
    def klcore_step_start(self, step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt("simulated interruption")


def _plugins(*extra: tuple[str, object]):
    from entropy_rl import plugin

    return build_plugin_manager(plugins=[("entropy_rl", plugin), *extra], load_entrypoints=False)


def _trainer(run_dir: Path, plugins, resume: bool = False) -> GRPOTrainer:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    cfg = GRPOConfig(
        steps=5, lr=3e-3, prompts_per_step=4, group_size=4, progress=False, checkpoint_every=2, resume=resume,
        metrics={"entropy_dynamics": {"max_states": 20, "ratio": 0.05}},
    )
    return GRPOTrainer(model, char_tokenizer(), _StartsEven(digits=1), cfg, run_dir=run_dir, plugins=plugins)


def _probe_rows(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(("dynamics/", "cov/"))} for r in rows]


def test_resumed_run_gives_the_uninterrupted_probe_metrics(tmp_path: Path) -> None:
    _trainer(tmp_path / "whole", _plugins()).train()
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _trainer(cut, _plugins(("crash", _Crash()))).train()
    assert len(_probe_rows(cut)) == 3  # steps 0-2 logged; the checkpoint holds steps 0-1
    _trainer(cut, _plugins(), resume=True).train()
    whole, resumed = _probe_rows(tmp_path / "whole"), _probe_rows(cut)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    # the run statistics after the resume cover every step, not only the resumed ones
    assert "dynamics/run_corr_cov_neg_dh" in whole[-1]
    assert resumed == whole


@pytest.mark.slow
def test_two_processes_each_resume_their_own_series(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_resume_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(latest_checkpoint(tmp_path / "cut") / "klcore_plugins.pt", weights_only=True)
    series = state["metric:entropy_dynamics"]["run_series"]
    assert len(series) == 2 and not torch.equal(series[0], series[1])  # each rank's own batches
    whole, resumed = _probe_rows(tmp_path / "whole"), _probe_rows(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert resumed == whole


class _Accelerator:
    def __init__(self, processes: int, rank: int) -> None:
        self.num_processes, self.process_index = processes, rank


class _Trainer:
    """The part of a trainer the checkpoint hooks read."""

    def __init__(self, processes: int = 1, rank: int = 0) -> None:
        self.accelerator = _Accelerator(processes, rank)


def test_probe_state_round_trip_and_mismatch() -> None:
    probe = EntropyDynamics()
    probe._run_cov, probe._run_change = [0.5, -0.25, 1.0], [-0.1, 0.2, -0.3]
    # what the trainer writes, read back with the stock safe loader
    buffer = io.BytesIO()
    torch.save(probe.klcore_save_checkpoint(trainer=_Trainer()), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = EntropyDynamics()
    restored.klcore_load_checkpoint(trainer=_Trainer(), state=state)
    assert restored._run_cov == probe._run_cov and restored._run_change == probe._run_change
    with pytest.raises(CheckpointError, match="2 processes"):
        EntropyDynamics().klcore_load_checkpoint(trainer=_Trainer(processes=2, rank=1), state=state)
    with pytest.raises(CheckpointError, match=r"\[2, steps\]"):
        EntropyDynamics().klcore_load_checkpoint(trainer=_Trainer(), state={"run_series": [torch.zeros(3)]})
