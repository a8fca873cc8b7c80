"""Implementation of :class:`hypo.integrations.trl.HyPODPOTrainer` (imports trl; private).

Per training micro-batch of B preference pairs: TRL's DPO loss on the pairs (unchanged), plus, when
``kl_coef`` > 0, ``group_size`` = k completions per prompt sampled from the current policy through TRL's
generation path (``unwrap_model_for_generation`` + ``generate``, temperature 1, no top-k/top-p), scored
by the policy (with grad) and by the reference (TRL's ``ref_model``, or under PEFT the model with its
adapter switched off, as TRL's DPO does) with TRL's fused log-prob head, and HyPO's RLOO surrogate
:func:`hypo.online_kl.rloo_kl_surrogate` (a mean over the B prompts) added with coefficient λ.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import GenerationConfig
from trl import DPOTrainer
from trl.models import unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from hypo._truncation import warn_truncated_once
from hypo.online_kl import rloo_kl_surrogate, sequence_log_ratio
from klcore.errors import ConfigError

#: online samples: ``input_ids`` / ``attention_mask`` / ``completion_mask`` ``[N, L]`` (right-padded prompt +
#: completion) and ``ended`` ``[N]`` (the completion stopped at EOS)
OnlineRows = dict[str, torch.Tensor]


def _check_options(kl_coef: object, group_size: object, max_new_tokens: object) -> None:
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not math.isfinite(kl_coef) or kl_coef < 0:
        raise ConfigError(f"kl_coef (HyPO's lambda) must be a finite number >= 0, got {kl_coef!r}; 0 is plain DPO")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(
            f"group_size (k online samples per prompt) must be an int >= 2 for the leave-one-out baseline, "
            f"got {group_size!r}"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens (online sample length) must be an int >= 1, got {max_new_tokens!r}")


def _right_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, L]`` ids right-padded with ``pad_id`` and their 0/1 attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    return ids.to(device), attn.to(device)


class HyPODPOTrainer(DPOTrainer):
    """TRL ``DPOTrainer`` plus HyPO's online reverse-KL term (Song et al. 2024); other arguments go to TRL.

    ``kl_coef`` (λ, default 0.1; 0 is ``DPOTrainer`` exactly), ``group_size`` (k >= 2 online samples per
    prompt), ``max_new_tokens`` (their length). The samples are drawn at temperature 1 without top-k / top-p
    (the score-function gradient needs samples from π_θ itself), once per training micro-batch, so each is
    on-policy. Metrics logged with TRL's: ``kl/online`` (k1 estimate of the sequence KL on the samples),
    ``kl/online_std``, ``kl/surrogate`` (λ x the surrogate, mean zero), ``response/length_mean``,
    ``response/truncated`` (fraction without EOS). Evaluation reports TRL's DPO metrics only.
    """

    def __init__(
        self, *args: Any, kl_coef: float = 0.1, group_size: int = 4, max_new_tokens: int = 128, **kwargs: Any
    ) -> None:
        _check_options(kl_coef, group_size, max_new_tokens)
        self.kl_coef = float(kl_coef)
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        super().__init__(*args, **kwargs)
        if self.kl_coef > 0:
            self._check_online_setup()
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(self._tokenizer.eos_token_id)
        self._eos_ids = sorted(i for i in eos_ids if i is not None)
        #: sampling of the online completions: π_θ itself (temperature 1, no truncation of the distribution)
        self._online_generation_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "pad_token_id": self._tokenizer.pad_token_id, "eos_token_id": self._eos_ids,
        }
        self._online_generation_config = GenerationConfig(**self._online_generation_kwargs, disable_compile=True)
        self._warned_truncation = False

    def _check_online_setup(self) -> None:
        args = self.args
        if self.ref_model is None and not is_peft_model(self.model):
            raise ConfigError(
                "HyPO's online term scores fresh samples with the reference model, but with "
                "precompute_ref_log_probs=True and no ref_model TRL keeps none: pass ref_model=, train a PEFT "
                "adapter (the reference is then the adapter-disabled model) or set precompute_ref_log_probs=False"
            )
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3):
            raise ConfigError(
                "HyPODPOTrainer scores the online samples with the unwrapped policy, which FSDP and DeepSpeed ZeRO-3 "
                "shard; use DDP or ZeRO-1/2, or kl_coef=0"
            )
        if self._is_vision_dataset or self._is_vlm:
            raise ConfigError("HyPODPOTrainer samples text-only online completions; vision-language data is not supported")
        if getattr(args, "padding_free", False):
            raise ConfigError("HyPODPOTrainer needs padded batches to read the prompts; set padding_free=False")

    # --- loss -------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.kl_coef == 0 or not getattr(self.model, "training", False):
            return out
        loss, rest = (out[0], out[1:]) if return_outputs else (out, ())
        loss = loss + self._online_term(model, inputs)
        return (loss, *rest) if return_outputs else loss

    def _online_term(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """λ x the RLOO surrogate on k fresh samples for each prompt of ``inputs`` (scalar); logs its metrics."""
        rows = self._sample_online(self._prompts(inputs))
        policy = self.accelerator.unwrap_model(model)
        log_prob = self._completion_logps(policy, rows)
        with torch.no_grad():
            ref_log_prob = self._reference_logps(rows)
        mask = rows["completion_mask"][:, 1:]
        surrogate, _ = rloo_kl_surrogate(log_prob, ref_log_prob, mask, group_size=self.group_size, coef=self.kl_coef)
        self._log_online(log_prob.detach(), ref_log_prob, rows, surrogate.detach())
        return surrogate

    def _prompts(self, inputs: dict[str, torch.Tensor]) -> list[list[int]]:
        """The prompt token ids of the micro-batch's pairs (the first half of TRL's [chosen; rejected] rows)."""
        b = inputs["input_ids"].shape[0] // 2
        ids, attn, comp = (inputs[k][:b].cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
        keep = attn.bool() & ~comp.bool()
        return [row[k].tolist() for row, k in zip(ids, keep, strict=True)]

    @torch.no_grad()
    def _sample_online(self, prompts: list[list[int]]) -> OnlineRows:
        """k completions per prompt from the current policy through TRL's generation path, as right-padded rows
        prompt + completion (cut after the first EOS) with the completion's mask."""
        k, device, pad_id = self.group_size, self.accelerator.device, self._tokenizer.pad_token_id
        repeated = [p for p in prompts for _ in range(k)]
        width = max(len(p) for p in repeated)
        ids = torch.full((len(repeated), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(repeated):  # left-padded for generation, as TRL's online trainers do
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, width - len(p) :] = 1
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, generation_kwargs=self._online_generation_kwargs,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,  # type: ignore[arg-type]
        ) as unwrapped:
            out = unwrapped.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=self._online_generation_config
            )
        completions = out[:, width:].cpu()
        is_eos = torch.isin(completions, torch.tensor(self._eos_ids))
        length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completions.shape[1])
        seqs = [p + c[:n].tolist() for p, c, n in zip(repeated, completions, length.tolist(), strict=True)]
        input_ids, attention_mask = _right_padded(seqs, pad_id, device)
        completion_mask = torch.zeros_like(attention_mask)
        for i, (p, n) in enumerate(zip(repeated, length.tolist(), strict=True)):
            completion_mask[i, len(p) : len(p) + n] = 1
        truncated = (~is_eos.any(1)).float().mean().item()
        self._warned_truncation = warn_truncated_once(truncated, self.max_new_tokens, self._warned_truncation)
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "ended": is_eos.any(1).to(device),
        }

    def _completion_logps(self, model: torch.nn.Module, rows: OnlineRows) -> torch.Tensor:
        """``[N, L - 1]`` log-probs of each row's next token through TRL's fused head, 0 off the completion."""
        labels = rows["input_ids"].masked_fill(rows["completion_mask"] == 0, -100)
        with self.accelerator.autocast():
            out = model(
                input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False,
            )
        width = rows["input_ids"].shape[1] - 1
        return out.log_probs[:, -width:].float() * rows["completion_mask"][:, 1:]

    def _reference_logps(self, rows: OnlineRows) -> torch.Tensor:
        """The reference's ``_completion_logps``: TRL's ``ref_model``, or under PEFT the policy with its adapter
        switched off (or TRL's frozen ``"ref"`` adapter when the model came with a trained one)."""
        adapter: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        reference: Any = self.ref_model
        if reference is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            reference = self.model
        checkpointing: Any = self.args.gradient_checkpointing_kwargs
        with torch.no_grad(), disable_gradient_checkpointing(self.model, checkpointing), adapter:  # type: ignore[arg-type]
            return self._completion_logps(reference, rows)

    def _log_online(
        self, log_prob: torch.Tensor, ref_log_prob: torch.Tensor, rows: OnlineRows, surrogate: torch.Tensor
    ) -> None:
        mask = rows["completion_mask"][:, 1:]
        acc, metrics = self.accelerator, self._metrics["train"]
        r = acc.gather_for_metrics(sequence_log_ratio(log_prob, ref_log_prob, mask))
        lengths = acc.gather_for_metrics(mask.sum(1).float())
        ended = acc.gather_for_metrics(rows["ended"].float())
        metrics["kl/online"].append(r.mean().item())
        metrics["kl/online_std"].append(r.std().item() if r.numel() > 1 else 0.0)
        metrics["kl/surrogate"].append(acc.gather_for_metrics(surrogate.reshape(1)).mean().item())
        metrics["response/length_mean"].append(lengths.mean().item())
        metrics["response/truncated"].append(1.0 - ended.mean().item())
