"""``HyPOTrainer``: DPO-family loss on offline pairs plus λ x the online reverse-KL surrogate, on klcore's loop."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from hypo._truncation import warn_truncated_once
from hypo.config import HyPOConfig
from hypo.data import TokenizedPairs
from hypo.forward import completion_logprobs, completion_logprobs_chunked
from hypo.online_kl import rloo_kl_surrogate, sequence_log_ratio
from hypo.reference import reference_logps
from klcore.data import padding_id
from klcore.errors import ConfigError
from klcore.models import adapters_disabled, is_peft_model
from klcore.plugins import Plugins
from klcore.reduce import GlobalCounts
from klcore.rollout import Rollout, position_ids, sample
from klcore.trainer.base import Batch, Metrics, Trainer, step_seed

#: per-row sequence fields of a chosen / rejected / online block of the batch
FIELDS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")
RewardFn = Callable[[str, str], float]


def _concat_rows(blocks: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack row blocks of the ``FIELDS`` layout (left-padded prompt, right-padded response) into one batch:
    prompts left-padded and responses right-padded to the widest block, positions recomputed."""
    prompt_w = max(b["input_ids"].shape[1] - b["responses"].shape[1] for b in blocks)
    resp_w = max(b["responses"].shape[1] for b in blocks)
    ids, attn, resp, rmask = [], [], [], []
    for b in blocks:
        r = b["responses"].shape[1]
        left, right = prompt_w - (b["input_ids"].shape[1] - r), resp_w - r
        ids.append(torch.nn.functional.pad(b["input_ids"], (left, right), value=pad_token_id))
        attn.append(torch.nn.functional.pad(b["attention_mask"], (left, right), value=0))
        resp.append(torch.nn.functional.pad(b["responses"], (0, right), value=pad_token_id))
        rmask.append(torch.nn.functional.pad(b["response_mask"].long(), (0, right), value=0).bool())
    attention = torch.cat(attn)
    return {
        "input_ids": torch.cat(ids), "attention_mask": attention, "position_ids": position_ids(attention),
        "responses": torch.cat(resp), "response_mask": torch.cat(rmask),
    }


def _rollout_fields(roll: Rollout) -> dict[str, torch.Tensor]:
    return {
        "input_ids": roll.input_ids, "attention_mask": roll.attention_mask, "position_ids": roll.position_ids,
        "responses": roll.responses, "response_mask": roll.response_mask,
    }


#: default online sample length: this many times the offline data's completion width
ONLINE_WIDTH_FACTOR = 4


def online_width(pairs: TokenizedPairs, model: nn.Module) -> int:
    """Default ``max_new_tokens`` of the online samples: ``ONLINE_WIDTH_FACTOR`` x the offline completion
    width (a policy's answers run longer than the data's shortest-fitting width), within the model's
    position limit when its config states one."""
    width = ONLINE_WIDTH_FACTOR * int(pairs.chosen_ids.shape[1])
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and limit > pairs.prompt_ids.shape[1]:
        width = min(width, limit - int(pairs.prompt_ids.shape[1]))
    return max(1, width)


class HyPOTrainer(Trainer):
    """HyPO (Song et al. 2024) on klcore's accelerate loop; ``config.kl_coef = 0`` is DPO.

    ``pairs``: the tokenized offline pairs. ``ref_model`` (default: a frozen copy of ``model`` at
    construction; for a peft model the model itself with its adapters switched off, no copy) gives the
    offline reference log-probs once (cached in ``config.ref_cache``) and is kept afterwards only for the
    online term and validation. Reference log-probs are taken under the accelerator's autocast, as the
    policy's are, so at step 0 (policy = reference) every log-ratio is exactly 0 under mixed precision. ``eval_prompts`` (token-id lists) are
    sampled ``eval_samples`` times each for ``eval/reverse_kl`` (sequence KL(π ‖ π_ref), k1 estimate)
    and ``eval/length_mean``; with ``reward_fn(prompt_text, completion_text)`` also ``eval/reward``.
    """

    mask_key = "chosen_response_mask"
    progress_keys = ("dpo/loss", "rewards/accuracy", "kl/online", "eval/reverse_kl")

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pairs: TokenizedPairs,
        config: HyPOConfig,
        *,
        run_dir: str | Path,
        ref_model: nn.Module | None = None,
        eval_prompts: Sequence[Sequence[int]] | None = None,
        reward_fn: RewardFn | None = None,
        plugins: Plugins | None = None,
        accelerator: Accelerator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if len(pairs) < config.pairs_per_step:
            raise ConfigError(
                f"pairs_per_step = {config.pairs_per_step} but the data holds {len(pairs)} pairs; lower pairs_per_step"
            )
        if config.disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        #: the reference is the LoRA model's base, its adapters switched off (no second copy), as TRL does
        self.ref_is_base = ref_model is None and is_peft_model(model)
        ref = None
        if not self.ref_is_base:
            ref = (ref_model if ref_model is not None else copy.deepcopy(model)).eval().requires_grad_(False)
        super().__init__(model, config, run_dir=run_dir, plugins=plugins, accelerator=accelerator, optimizer=optimizer)
        self.config: HyPOConfig = config
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.eval_prompts = [list(p) for p in eval_prompts or []]
        self.reward_fn = reward_fn
        self.max_new_tokens = config.max_new_tokens or online_width(pairs, model)
        self._warned_truncation = False
        acc = self.accelerator
        needs_ref = config.kl_coef > 0 or bool(self.eval_prompts)
        self.ref_model: nn.Module | None = ref.to(acc.device) if ref is not None else None
        cache = Path(config.ref_cache) if config.ref_cache else self.run_dir / "ref_logps.safetensors"
        for main in (True, False):  # the main process writes the cache, then the others read it
            if acc.is_main_process == main:
                with self._reference() as reference:
                    self.ref_chosen, self.ref_rejected = reference_logps(
                        reference, pairs, cache_path=cache, batch_size=config.ref_batch_size
                    )
            if main:
                acc.wait_for_everyone()
        if not needs_ref:
            self.ref_model = None
            self.ref_is_base = False

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The reference policy to call, under the policy's autocast: the frozen copy, or the prepared model
        with its adapters off."""
        with self.accelerator.autocast():
            if self.ref_is_base:
                with adapters_disabled(self.unwrapped_model):
                    yield self.model
            elif self.ref_model is not None:
                yield self.ref_model
            else:
                raise ConfigError("this trainer keeps no reference model (kl_coef = 0 and no eval_prompts)")

    # --- collection -----------------------------------------------------------------------------

    def collect(self, step: int) -> tuple[Batch, Metrics]:
        cfg, acc = self.config, self.accelerator
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step) + acc.process_index)
        index = torch.randperm(len(self.pairs), generator=gen)[: cfg.pairs_per_step]
        batch: Batch = {}
        for which in ("chosen", "rejected"):
            for k, v in self.pairs.sequences(index, which).items():
                batch[f"{which}_{k}"] = v
        batch["ref_chosen_logps"] = self.ref_chosen[index]
        batch["ref_rejected_logps"] = self.ref_rejected[index]
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        metrics: Metrics = {}
        if cfg.kl_coef > 0:
            metrics.update(self._collect_online(self.pairs.prompts(index), batch, gen))
        return batch, metrics

    def _collect_online(self, prompts: list[list[int]], batch: Batch, gen: torch.Generator) -> Metrics:
        """Sample k completions per prompt from the current policy; store them with reference log-probs."""
        k, tok = self.config.group_size, self.tokenizer
        roll = sample(
            self.unwrapped_model, prompts, group_size=k, max_new_tokens=self.max_new_tokens,
            eos_token_id=tok.eos_token_id, pad_token_id=padding_id(tok), generator=gen,
        )
        fields = _rollout_fields(roll)
        ref_lp = self._ref_logprobs(fields)
        n = len(prompts)
        for key, value in (*fields.items(), ("ref_log_prob", ref_lp)):
            batch[f"online_{key}"] = value.reshape(n, k, *value.shape[1:])
        mask = roll.response_mask
        truncated = float((~(roll.responses == tok.eos_token_id).any(1)).float().mean())
        self._warned_truncation = warn_truncated_once(truncated, self.max_new_tokens, self._warned_truncation)
        return {
            "kl/online_sampled": float(sequence_log_ratio(roll.logprobs, ref_lp, mask).mean()),
            "response/length_mean": float(mask.sum(1).float().mean()),
            "response/truncated": truncated,
        }

    def _ref_logprobs(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._reference() as reference:
            return completion_logprobs_chunked(reference, fields, self.config.micro_batch_size or 256)

    # --- loss -------------------------------------------------------------------------------------

    def compute_loss(self, batch: Batch, counts: GlobalCounts) -> tuple[torch.Tensor, Metrics, Batch]:
        cfg = self.config
        b = batch["chosen_input_ids"].shape[0]
        blocks = [{k: batch[f"{which}_{k}"] for k in FIELDS} for which in ("chosen", "rejected")]
        if cfg.kl_coef > 0:
            blocks.append({k: batch[f"online_{k}"].flatten(0, 1) for k in FIELDS})
        rows = _concat_rows(blocks, self.pairs.pad_token_id)
        # one forward for chosen, rejected and online rows (DDP expects one forward per backward)
        log_prob = completion_logprobs(self.model, rows)
        seq = log_prob[: 2 * b].sum(-1)
        lengths = rows["response_mask"][: 2 * b].sum(-1)
        losses, raw = self.loss_fn(
            seq[:b], seq[b:], batch["ref_chosen_logps"], batch["ref_rejected_logps"],
            beta=cfg.beta, label_smoothing=cfg.label_smoothing,
            chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
        )
        share = counts.world_size / counts.sequences  # this micro-batch's share of the global mean over pairs
        dpo = losses.sum() * share
        metrics: Metrics = {**raw, "dpo/loss": float(losses.detach().mean())}
        loss = dpo
        if cfg.kl_coef > 0:
            width = batch["online_ref_log_prob"].shape[-1]
            surrogate, kl_metrics = rloo_kl_surrogate(
                log_prob[2 * b :, :width], batch["online_ref_log_prob"].flatten(0, 1),
                rows["response_mask"][2 * b :, :width], group_size=cfg.group_size, coef=cfg.kl_coef,
            )
            term = surrogate * b * share  # the surrogate is a mean over this micro-batch's b prompts
            loss = loss + term
            metrics.update(kl_metrics)
            metrics["kl/surrogate"] = float(surrogate.detach())
        return loss, metrics, {"log_prob": log_prob}

    # --- validation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Metrics:
        """Sequence reverse KL to the reference, length and (with ``reward_fn``) reward on the eval prompts."""
        if not self.eval_prompts:
            return {}
        cfg, tok = self.config, self.tokenizer
        gen = torch.Generator().manual_seed(cfg.seed + 99)
        roll = sample(
            self.unwrapped_model, self.eval_prompts, group_size=cfg.eval_samples, max_new_tokens=self.max_new_tokens,
            eos_token_id=tok.eos_token_id, pad_token_id=padding_id(tok), generator=gen,
        )
        fields = _rollout_fields(roll)
        mask = roll.response_mask
        kl = sequence_log_ratio(roll.logprobs, self._ref_logprobs(fields), mask)
        metrics = {"eval/reverse_kl": float(kl.mean()), "eval/length_mean": float(mask.sum(1).float().mean())}
        if self.reward_fn is not None:
            prompts = tok.batch_decode(roll.input_ids[:, : roll.prompt_length], skip_special_tokens=True)
            texts = tok.batch_decode(roll.responses, skip_special_tokens=True)
            rewards = [self.reward_fn(p, t) for p, t in zip(prompts, texts, strict=True)]
            metrics["eval/reward"] = sum(rewards) / len(rewards)
        return metrics


__all__ = ["ONLINE_WIDTH_FACTOR", "HyPOTrainer", "online_width"]
