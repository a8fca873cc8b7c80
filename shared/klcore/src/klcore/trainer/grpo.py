"""GRPO-family RL on a verifiable task: sample a group per prompt, score, advantage, PPO update.

The policy loss is looked up by name in the registry (``config.loss``, built-in ``vanilla`` =
PPO-clip), the advantage estimator by ``config.advantage`` (``grpo``, ``dr_grpo``, ``rloo``).
A policy loss with a ``prepare`` attribute gets per-row tensors computed over the whole optimiser
mini-batch (see :meth:`GRPOTrainer.prepare_minibatch`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from klcore import advantages as adv_lib
from klcore.data import padding_id, score_completions
from klcore.divergences import kl_estimate
from klcore.errors import PluginError
from klcore.logprobs import token_logprobs_and_entropy
from klcore.models import adapters_disabled, is_peft_model
from klcore.plugins import Plugins
from klcore.reduce import GlobalCounts, aggregate
from klcore.rollout import forward_accepts, pass_at_k, sample
from klcore.toy.tasks import Task
from klcore.toy.warmup import encode_prompts, evaluate
from klcore.trainer.base import Batch, Metrics, Trainer, step_seed
from klcore.trainer.config import GRPOConfig

#: Batch-key prefix of the tensors a policy loss's ``prepare`` returned (see ``prepare_minibatch``).
PREPARED_PREFIX = "prepared/"


def policy_forward(
    model: nn.Module, batch: Mapping[str, torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_prob, entropy)`` ``[rows, R]`` float32 of the batch's response tokens under ``model``.

    Only the last R + 1 positions' logits are computed when the model supports ``logits_to_keep``.
    """
    responses = batch["responses"]
    r = responses.shape[1]
    kwargs: dict[str, Any] = {"logits_to_keep": r + 1} if forward_accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False, **kwargs,
    )
    logits = out.logits[:, -(r + 1) : -1]
    return token_logprobs_and_entropy(logits, responses, temperature=temperature)


class GRPOTrainer(Trainer):
    """RL with verifiable rewards on a :class:`klcore.toy.Task`-like object.

    ``task`` provides ``problems(n, generator=, split=)`` and ``verify(problem, completion)`` (a toy
    task, or a ``klcore.data.PromptDataset`` scored by its reward). ``eval_tasks`` (name -> task) are
    evaluated greedily on their ``test`` split and logged as ``eval/<name>_accuracy``. ``ref_model``
    (default: a frozen copy of ``model``; for a peft LoRA model, the same model with its adapters off)
    is used only when ``config.kl_coef > 0``. A tokenizer without a pad token pads with EOS.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        config: GRPOConfig,
        *,
        run_dir: str | Path,
        eval_tasks: Mapping[str, Task] | None = None,
        ref_model: nn.Module | None = None,
        plugins: Plugins | None = None,
        accelerator: Accelerator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if config.disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        ref = None
        #: the KL reference is the LoRA model's base, its adapters switched off (no second copy)
        self.ref_is_base = config.kl_coef > 0 and ref_model is None and is_peft_model(model)
        if config.kl_coef > 0 and not self.ref_is_base:
            ref = (ref_model if ref_model is not None else copy.deepcopy(model)).eval().requires_grad_(False)
        super().__init__(model, config, run_dir=run_dir, plugins=plugins, accelerator=accelerator, optimizer=optimizer)
        self.config: GRPOConfig = config
        self.tokenizer = tokenizer
        self.task = task
        self.eval_tasks = dict(eval_tasks or {})
        self.ref_model = ref.to(self.accelerator.device) if ref is not None else None
        self.max_new_tokens = config.max_new_tokens or task.max_answer_chars + 2
        self.advantage_fn = adv_lib.by_name(config.advantage)

    def collect(self, step: int) -> tuple[Batch, Metrics]:
        cfg, acc, tok = self.config, self.accelerator, self.tokenizer
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step) + acc.process_index)
        problems = self.task.problems(cfg.prompts_per_step, generator=gen, split="train")
        roll = sample(
            self.unwrapped_model, encode_prompts(tok, problems), group_size=cfg.group_size,
            max_new_tokens=self.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=padding_id(tok),
            temperature=cfg.temperature, top_p=cfg.top_p, generator=gen,
        )
        texts = tok.batch_decode(roll.responses, skip_special_tokens=True)
        g = cfg.group_size
        scored = score_completions(self.task, [problems[i // g] for i in range(len(texts))], texts)
        rewards = torch.tensor(scored, dtype=torch.float32).view(-1, g)
        mask = roll.response_mask
        seq_adv = self.advantage_fn(rewards).reshape(-1, 1).to(mask.device)
        batch: Batch = {
            "input_ids": roll.input_ids,
            "attention_mask": roll.attention_mask,
            "position_ids": roll.position_ids,
            "responses": roll.responses,
            "response_mask": mask,
            "advantages": seq_adv * mask,
            "rollout_log_prob": roll.logprobs,
            "rewards": rewards.reshape(-1).to(mask.device),
        }
        with torch.no_grad():
            batch["old_log_prob"], entropy = self._in_chunks(self.model, batch)
            if self.ref_model is not None:
                batch["ref_log_prob"], _ = self._in_chunks(self.ref_model, batch)
            elif self.ref_is_base:
                with adapters_disabled(self.unwrapped_model):
                    batch["ref_log_prob"], _ = self._in_chunks(self.model, batch)
        correct = rewards.sum(1).long().tolist()
        lengths = mask.sum(1).float()
        valid = mask.float()
        metrics: Metrics = {
            "reward/mean": float(rewards.mean()),
            f"reward/pass_at_{g}": sum(pass_at_k(g, c, g) for c in correct) / len(correct),
            "response/length_mean": float(lengths.mean()),
            "response/truncated": float((~(roll.responses == tok.eos_token_id).any(1)).float().mean()),
            "entropy/mean": float((entropy * valid).sum() / valid.sum()),
            "rollout/kl_mismatch": float(
                (kl_estimate(roll.logprobs, batch["old_log_prob"], "k3", mask=mask) * valid).sum() / valid.sum()
            ),
            **getattr(self.task, "metrics", {}),
        }
        return batch, metrics

    def prepare_minibatch(self, mini: Batch, micro: int) -> Batch:
        """For a policy loss with a ``prepare`` attribute: its per-row tensors for this mini-batch.

        ``loss_fn.prepare(old_log_prob, log_prob, advantages, mask, accelerator=..., **loss_options)``
        is called once per optimiser mini-batch on every process, with the current policy's log-probs
        computed without gradient in micro-batch chunks; it returns a dict of ``[rows, ...]`` tensors,
        stored as ``prepared/<name>`` and passed to each micro-batch's loss call as ``name=`` (its rows).
        """
        prepare = getattr(self.loss_fn, "prepare", None)
        if prepare is None:
            return {}
        rows = mini[self.mask_key].shape[0]
        with torch.no_grad(), self.accelerator.autocast():
            log_prob, _ = self._in_chunks(self.model, mini, micro)
        extra = prepare(
            mini["old_log_prob"], log_prob, mini["advantages"], mini[self.mask_key],
            accelerator=self.accelerator, **self.config.loss_options,
        )
        for name, value in extra.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
                raise PluginError(
                    f"{self.config.loss}.prepare returned {name!r} = {getattr(value, 'shape', type(value).__name__)}; "
                    f"expected a tensor with one row per mini-batch row ({rows})"
                )
        return {PREPARED_PREFIX + name: value for name, value in extra.items()}

    def _in_chunks(self, model: nn.Module, batch: Batch, rows_per_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch["responses"].shape[0]
        step = rows_per_chunk or self.config.micro_batch_size or rows
        parts = [
            policy_forward(model, {k: v[s : s + step] for k, v in batch.items()}, self.config.temperature)
            for s in range(0, rows, step)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def compute_loss(self, batch: Batch, counts: GlobalCounts) -> tuple[torch.Tensor, Metrics, Batch]:
        cfg = self.config
        log_prob, entropy = policy_forward(self.model, batch, cfg.temperature)
        mask = batch["response_mask"]
        # a constant divisor for seq-mean-token-sum-norm, the same on every rank
        norm_length = cfg.norm_length or self.max_new_tokens
        agg = {"agg": cfg.agg, "counts": counts, "norm_length": norm_length}
        prepared = {k[len(PREPARED_PREFIX) :]: v for k, v in batch.items() if k.startswith(PREPARED_PREFIX)}
        loss, raw = self.loss_fn(
            batch["old_log_prob"], log_prob, batch["advantages"], mask, **agg, **cfg.loss_options, **prepared
        )
        metrics = {k: float(v) for k, v in raw.items()}
        if "ref_log_prob" in batch:
            per_token = kl_estimate(log_prob, batch["ref_log_prob"], cfg.kl_estimator, mask=mask)
            loss = loss + cfg.kl_coef * aggregate(per_token, mask, cfg.agg, counts=counts, norm_length=norm_length)
            metrics["kl/ref"] = float(per_token.detach().sum() / mask.sum().clamp(min=1))
        return loss, metrics, {"log_prob": log_prob, "entropy": entropy.detach()}

    def evaluate(self) -> Metrics:
        """Greedy exact-match accuracy on each eval task's held-out split."""
        model = self.unwrapped_model
        return {
            f"eval/{name}_accuracy": evaluate(
                model, self.tokenizer, task, n=self.config.eval_problems, seed=self.config.seed + 99,
                max_new_tokens=self.config.max_new_tokens,
            )
            for name, task in self.eval_tasks.items()
        }
