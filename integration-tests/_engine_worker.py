"""Worker of ``test_engines.py``: klcore's trainer under one accelerate engine on 2 CPU processes (gloo).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 _engine_worker.py ENGINE OUT``
with ENGINE ``ddp``, ``fsdp2`` or ``deepspeed<stage>`` (ZeRO stage 0-3). Two parts:

* ``fixed``: :class:`FixedBatchTrainer` on this rank's half of :func:`global_batch` (two SGD steps,
  micro-batches of 3 rows); rank 0 saves the full final weights and the logged metrics to
  ``OUT/fixed.pt`` (the test compares them with one process on the whole batch);
* ``sampling``: greedy decoding with the trained model where the ranks' rows stop at different
  lengths (``OUT/sampling.rank<i>.json``);
* ``grpo``: the toy GRPO trainer for 4 steps with a checkpoint at step 2 (``OUT/full``), then a fresh
  trainer for 2 steps (``OUT/part``) and a third resuming it to step 4.

The engine is chosen the way ``accelerate launch`` does it, through environment variables. Two CPU
shims, because accelerate only enables DeepSpeed and FSDP on accelerator devices: the process group is
created first with the gloo backend, and for FSDP accelerate's state is told the processes are GPU
workers (its FSDP switch checks the device type only; everything then runs on the CPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from klcore.logprobs import token_logprobs
from klcore.reduce import GlobalCounts, aggregate
from klcore.rollout import is_sharded, sample
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer, Trainer, TrainerConfig

ROWS, LENGTH = 8, 12


def global_batch() -> dict[str, torch.Tensor]:
    """Eight rows of random tokens with ragged response masks and per-token advantages."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 20, (ROWS, LENGTH), generator=gen)
    lengths = torch.tensor([11, 3, 7, 1, 9, 11, 5, 2])
    mask = torch.arange(LENGTH - 1)[None, :] < lengths[:, None]
    return {"input_ids": ids, "response_mask": mask, "advantages": torch.randn(ROWS, LENGTH - 1, generator=gen)}


class FixedBatchTrainer(Trainer):
    """Policy-gradient loss ``token-mean(-A * log p)`` on the same batch every step."""

    def __init__(self, model: torch.nn.Module, config: TrainerConfig, batch: dict[str, torch.Tensor], **kw) -> None:
        super().__init__(model, config, **kw)
        self.batch = batch

    def collect(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return {k: v.to(self.accelerator.device) for k, v in self.batch.items()}, {}

    def compute_loss(self, batch: dict[str, torch.Tensor], counts: GlobalCounts):
        ids = batch["input_ids"]
        log_prob = token_logprobs(self.model(input_ids=ids).logits[:, :-1], ids[:, 1:])
        loss = aggregate(-batch["advantages"] * log_prob, batch["response_mask"], "token-mean", counts=counts)
        return loss, {}, {}


def fixed_config() -> TrainerConfig:
    return TrainerConfig(steps=2, micro_batch_size=3, max_grad_norm=1e6, progress=False)


def fixed_run(run_dir: Path, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[dict], Trainer]:
    """Full final weights, metrics and the trainer of :class:`FixedBatchTrainer` on ``batch``."""
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    trainer = FixedBatchTrainer(
        model, fixed_config(), batch, run_dir=run_dir, optimizer=torch.optim.SGD(model.parameters(), lr=0.5)
    )
    history = trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model) or {}  # ZeRO-3 gathers it on rank 0 only
    return {k: v.detach().float().cpu() for k, v in state.items()}, history, trainer


def uneven_sampling(model: torch.nn.Module, rank: int) -> dict[str, object]:
    """Greedy decoding where rank 0's row stops at its first token and rank 1's never stops (an EOS id
    outside the vocabulary): with sharded parameters rank 0 must keep running forwards with rank 1."""
    prompt = [[1, 5, 6, 7]]
    first = int(sample(model, prompt, max_new_tokens=1, eos_token_id=-1, pad_token_id=0, greedy=True).responses[0, 0])
    roll = sample(model, prompt, max_new_tokens=6, eos_token_id=first if rank == 0 else -1, pad_token_id=0, greedy=True)
    return {"sharded": is_sharded(model), "response_mask": roll.response_mask[0].tolist()}


class StartsEven(AdditionTask):
    """Rewards a completion whose first character has an even code point: a random policy scores about
    half the time, so the groups have signal."""

    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def grpo_run(run_dir: Path, steps: int, resume: bool = False) -> None:
    config = GRPOConfig(
        steps=steps, lr=1e-3, prompts_per_step=2, group_size=4, eval_problems=4, eval_every=2,
        micro_batch_size=3, checkpoint_every=2, resume=resume, progress=False,
    )
    GRPOTrainer(
        tiny_causal_lm(tiny_config("tiny"), seed=0), char_tokenizer(), StartsEven(digits=1), config,
        run_dir=run_dir, eval_tasks={"addition": AdditionTask(digits=1)},
    ).train()


def select_engine(engine: str, out: Path) -> None:
    """Environment (and CPU shims) that make ``Accelerator()`` pick ``engine``."""
    if engine == "ddp":
        os.environ["ACCELERATE_USE_CPU"] = "1"
        return
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(backend="gloo")
    if engine == "fsdp2":
        state._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    elif engine.startswith("deepspeed"):
        config = {
            # gathering the weights for get_state_dict (ZeRO-3; the model stays in float32 here)
            "zero_optimization": {
                "stage": int(engine.removeprefix("deepspeed")), "stage3_gather_16bit_weights_on_model_save": True
            },
            "zero_allow_untested_optimizer": True,  # plain SGD in the fixed-batch part
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
        path = out / "deepspeed.json"
        if state.is_main_process:
            path.write_text(json.dumps(config))
        state.wait_for_everyone()
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(path))
    else:
        raise SystemExit(f"unknown engine {engine!r}")


def main(engine: str, out: Path) -> None:
    select_engine(engine, out)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    share = ROWS // world
    batch = {k: v[rank * share : (rank + 1) * share] for k, v in global_batch().items()}
    state, history, trainer = fixed_run(out / "fixed-run", batch)
    if rank == 0:
        torch.save({"state": state, "history": history}, out / "fixed.pt")
    (out / f"sampling.rank{rank}.json").write_text(json.dumps(uneven_sampling(trainer.unwrapped_model, rank)))
    grpo_run(out / "full", steps=4)
    grpo_run(out / "part", steps=2)
    grpo_run(out / "part", steps=4, resume=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
