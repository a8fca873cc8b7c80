"""Global scope: the selection does not depend on how the mini-batch is split over processes or micro-batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from entropy_rl import clip_cov_selection, kl_cov_selection, token_covariance

from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer

HERE = Path(__file__).resolve().parent


def _batch(rows: int = 10, width: int = 14):
    g = torch.Generator().manual_seed(11)
    old = -torch.rand(rows, width, generator=g) * 4
    new = old + 0.5 * torch.randn(rows, width, generator=g)
    adv = (torch.randn(rows, 1, generator=g) * 3).expand(rows, width).clone()
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[:6] = torch.clamp(lengths[:6], max=9)  # rank 0's rows are narrower: padding across processes
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return old, new, adv, mask


@pytest.mark.slow
def test_two_processes_select_what_one_process_selects(tmp_path: Path) -> None:
    old, new, adv, mask = _batch()
    clip_options = (0.15, 0.1, 4.0)
    seed, kl_ratio = 5, 0.1
    # rank 0: rows 0..5 trimmed to width 9 (all its valid tokens fit); rank 1: rows 6..9 at full width
    shares = torch.tensor([[0, 6, 9], [6, 10, 14]])
    inputs, out = tmp_path / "in.pt", tmp_path / "out"
    torch.save(
        {"old": old, "new": new, "adv": adv, "mask": mask, "shares": shares, "clip_options": torch.tensor(clip_options),
         "seed": seed, "kl_ratio": kl_ratio},
        inputs,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_two_process_worker.py"), str(inputs), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]

    def stitched(key: str) -> torch.Tensor:
        full = torch.zeros(old.shape, dtype=ranks[0][key].dtype)
        for (lo, hi, width), res in zip(shares.tolist(), ranks):
            full[lo:hi, :width] = res[key]
        return full

    one_clip = clip_cov_selection(
        old, new, adv, mask, ratio=clip_options[0], cov_bounds=clip_options[1:],
        generator=torch.Generator().manual_seed(seed),
    )
    one_kl = kl_cov_selection(new, adv, mask, ratio=kl_ratio)
    assert int(one_clip.sum()) >= 3 and int(one_kl.sum()) >= 3
    assert torch.equal(stitched("clip_cov"), one_clip)
    assert torch.equal(stitched("kl_cov"), one_kl)
    torch.testing.assert_close(stitched("cov"), token_covariance(new, adv, mask))
    # the reference (per-process) selection differs: the global one is not trivially equal to it
    local = torch.cat([kl_cov_selection(new[:6], adv[:6], mask[:6], ratio=kl_ratio, scope="micro-batch"),
                       kl_cov_selection(new[6:], adv[6:], mask[6:], ratio=kl_ratio, scope="micro-batch")])
    assert not torch.equal(local, one_kl)


class _StartsEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def _update(tmp: Path, plugins, loss: str, micro: int, **options) -> torch.Tensor:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    cfg = GRPOConfig(
        steps=1, lr=1e-3, prompts_per_step=4, group_size=4, progress=False, loss=loss, ppo_epochs=2,
        micro_batch_size=micro, loss_options=options,
    )
    trainer = GRPOTrainer(
        model, char_tokenizer(), _StartsEven(digits=1), cfg, run_dir=tmp / f"{loss}-{micro}-{options}",
        plugins=plugins, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
    )
    history = trainer.train()
    assert history[0]["cov/selected_frac"] > 0
    return torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])


@pytest.mark.parametrize(
    ("loss", "options"),
    [("clip_cov", {"ratio": 0.2, "cov_bounds": [-10.0, 10.0]}), ("kl_cov", {"ratio": 0.2, "beta": 1.0})],
)
def test_one_and_four_micro_batches_give_the_same_update(tmp_path: Path, plugins, loss: str, options: dict) -> None:
    whole = _update(tmp_path, plugins, loss, 0, **options)
    torch.testing.assert_close(_update(tmp_path, plugins, loss, 4, **options), whole, rtol=1e-4, atol=1e-6)
    # control: the reference's per-micro-batch selection changes the update (two epochs: KL-Cov acts on the second)
    local = _update(tmp_path, plugins, loss, 4, scope="micro-batch", **options)
    assert not torch.allclose(local, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("loss", "options"),
    [("clip_cov", {"ratio": 0.2, "cov_bounds": [-10.0, 10.0]}), ("kl_cov", {"ratio": 0.2, "beta": 1.0})],
)
def test_one_micro_batch_one_process_global_equals_reference_scope(
    tmp_path: Path, plugins, loss: str, options: dict
) -> None:
    # with a single micro-batch on a single process the mini-batch is the micro-batch: the scopes coincide
    whole = _update(tmp_path, plugins, loss, 0, **options)
    torch.testing.assert_close(_update(tmp_path, plugins, loss, 0, scope="micro-batch", **options), whole)
