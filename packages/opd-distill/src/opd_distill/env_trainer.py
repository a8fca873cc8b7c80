"""``EnvDistillTrainer``: VLA-OPD's loop for an action-token policy acting in an environment.

Per step: the student rolls out G episodes for each of B task seeds, the frozen teacher labels every
visited state with its action-token logits, one update with the configured objective, fresh rollouts
next step (no replay, no reuse of labels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from klcore.errors import ConfigError
from klcore.logprobs import token_logprobs
from klcore.plugins import Plugins
from klcore.trainer.base import Batch, Metrics, step_seed
from opd_distill._loop import DistillLoop
from opd_distill.config import EnvDistillConfig
from opd_distill.env import Env
from opd_distill.objectives import check_vocab
from opd_distill.policies import Policy, rollout, success_rate

#: Task seeds at or above this value are held out for evaluation; training draws below it.
EVAL_SEED_START = 10_000_000


class EnvDistillTrainer(DistillLoop):
    """Distil ``teacher`` (a frozen policy: observations -> action-token logits) into ``policy``.

    ``make_env()`` builds one environment (Gymnasium-shaped, ``Discrete`` actions, observations with
    ``image`` and ``instruction``). Student, teacher and environment must agree on the number of
    action tokens. ``success/mean`` is the rollouts' success rate; ``eval/success`` the held-out one.
    """

    def __init__(
        self,
        policy: nn.Module,
        teacher: Policy,
        make_env: Callable[[], Env],
        config: EnvDistillConfig,
        *,
        run_dir: str | Path,
        plugins: Plugins | None = None,
        accelerator: Accelerator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        env = make_env()
        obs, _ = env.reset(seed=0)
        image = torch.from_numpy(obs["image"])[None]
        instruction = torch.tensor([obs["instruction"]])
        with torch.no_grad():
            student_actions = policy(image, instruction).shape[-1]
            check_vocab(student_actions, teacher(image, instruction).shape[-1])
        if student_actions != env.action_space.n:
            raise ConfigError(
                f"the policy scores {student_actions} action tokens but the environment has {env.action_space.n}; "
                "build the policy with num_actions=env.action_space.n"
            )
        super().__init__(policy, config, run_dir=run_dir, plugins=plugins, accelerator=accelerator, optimizer=optimizer)
        self.config: EnvDistillConfig = config
        self.teacher = teacher
        self.make_env = make_env
        self.eval_seeds: Sequence[int] = range(EVAL_SEED_START, EVAL_SEED_START + config.eval_episodes)

    def collect(self, step: int) -> tuple[Batch, Metrics]:
        cfg, acc = self.config, self.accelerator
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step) + acc.process_index)
        seeds = torch.randint(EVAL_SEED_START, (cfg.tasks_per_step,), generator=gen).tolist()
        student = self.unwrapped_model
        eps = rollout(
            lambda im, ins: student(im.to(acc.device), ins.to(acc.device)).cpu(),
            self.make_env,
            seeds,
            group_size=cfg.group_size,
            temperature=cfg.temperature,
            generator=gen,
        )
        n, t = eps.actions.shape
        batch: Batch = {
            "image": eps.image.to(acc.device),
            "instruction": eps.instruction.to(acc.device),
            "tokens": eps.actions.to(acc.device),
            "response_mask": eps.mask.to(acc.device),
        }
        with torch.no_grad():
            flat_image, flat_instruction = batch["image"].flatten(0, 1), batch["instruction"].repeat_interleave(t)
            batch["teacher_logits"] = self.teacher(flat_image, flat_instruction).float().view(n, t, -1)
            logits = self.student_logits(batch)
            batch["old_log_prob"] = token_logprobs(logits, batch["tokens"])
            metrics = self.state_metrics(logits, batch["teacher_logits"], batch["response_mask"])
        metrics["success/mean"] = float(eps.success.mean())
        metrics["episode/length_mean"] = float(eps.mask.sum(1).float().mean())
        return batch, metrics

    def student_logits(self, batch: Batch) -> torch.Tensor:
        n, t = batch["tokens"].shape
        logits = self.model(batch["image"].flatten(0, 1), batch["instruction"].repeat_interleave(t))
        return logits.view(n, t, -1)

    def evaluate(self) -> Metrics:
        """``eval/success``: success rate of the sampled student on the held-out task seeds."""
        student, device = self.unwrapped_model, self.accelerator.device
        return {"eval/success": success_rate(
            lambda im, ins: student(im.to(device), ins.to(device)).cpu(),
            self.make_env,
            self.eval_seeds,
            seed=self.config.seed + 99,
        )}


__all__ = ["EVAL_SEED_START", "EnvDistillTrainer"]
