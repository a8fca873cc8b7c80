"""klcore's trainer under accelerate's engines on 2 CPU processes (gloo): DDP, FSDP2, DeepSpeed ZeRO 0-3.

For each engine (see ``_engine_worker.py``):

* two SGD steps on a fixed global batch split over the two ranks (and into uneven micro-batches)
  give the weights, loss and gradient norm of one process stepping on the whole batch;
* greedy decoding whose rows stop at different lengths on the two ranks completes (sharded engines
  keep every rank running forwards until all have stopped);
* the toy GRPO run (rollouts, evaluation, checkpoints) resumed from its step-2 checkpoint logs the
  same metrics as the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _engine_worker import fixed_run, global_batch  # noqa: E402

from klcore.toy import tiny_causal_lm, tiny_config  # noqa: E402

ENGINES = ["ddp", "fsdp2", "deepspeed0", "deepspeed1", "deepspeed2", "deepspeed3"]
SHARDED = {"fsdp2", "deepspeed3"}


def _launch(engine: str, out: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "MASTER_", "WORLD_", "RANK"))}
    # the worker needs no plugin: skipping entry points spares each process importing every package
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", KLCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_engine_worker.py"), engine, str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _metrics(run_dir: Path) -> list[dict]:
    """Logged metrics without wall times and without the final evaluation (which runs on a run's last
    step: step 1 of the 2-step run that is then resumed)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.startswith("perf/") or k.endswith("_final"))} for r in rows]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state, history, _ = fixed_run(tmp_path_factory.mktemp("one-process"), global_batch())
    return state, history


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_one_process_and_resumes_exactly(engine: str, tmp_path: Path, one_process) -> None:
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `nox -s integration`")
    _launch(engine, tmp_path)

    state, history = one_process
    got = torch.load(tmp_path / "fixed.pt", weights_only=True)
    assert set(got["state"]) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    initial = tiny_causal_lm(tiny_config("tiny"), seed=0).state_dict()
    assert max(float((state[k] - initial[k]).abs().max()) for k in state) > 1e-3  # the steps moved the weights
    for mine, ref in zip(got["history"], history, strict=True):
        assert mine["loss/objective"] == pytest.approx(ref["loss/objective"], rel=1e-4)
        if engine == "deepspeed0":  # without ZeRO, DeepSpeed clips but does not report the norm
            assert math.isnan(mine["optim/grad_norm"])
        else:
            assert mine["optim/grad_norm"] == pytest.approx(ref["optim/grad_norm"], rel=1e-4)

    sampled = [json.loads((tmp_path / f"sampling.rank{r}.json").read_text()) for r in range(2)]
    assert [s["sharded"] for s in sampled] == [engine in SHARDED] * 2
    first, second = sampled[0]["response_mask"], sampled[1]["response_mask"]
    assert first[0] and not any(first[1:]) and all(second) and len(second) == 6
    # sharded: rank 0 kept decoding (padding) until rank 1 stopped; otherwise it stopped alone
    assert len(first) == (6 if engine in SHARDED else 1)
    full, part = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["step"] for r in full] == [0, 1, 2, 3]
    assert part == full
    assert engine == "deepspeed0" or any(r["optim/grad_norm"] > 0 for r in full)  # the GRPO steps had signal
    assert "eval/addition_accuracy" in full[0] and "eval/addition_accuracy" in full[2]
