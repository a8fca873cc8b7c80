"""What the text and environment distillation trainers share: the objective schedule and the loss step."""

from __future__ import annotations

import abc
from typing import Any

import torch

from klcore.divergences import forward_kl, reverse_kl
from klcore.logprobs import token_entropy
from klcore.reduce import GlobalCounts
from klcore.trainer.base import Batch, Metrics, Trainer
from opd_distill.objectives import OBJECTIVES


class DistillLoop(Trainer):
    """A klcore ``Trainer`` whose batches hold ``tokens``, ``response_mask``, ``teacher_logits`` ``[B, T, V]``,
    ``old_log_prob`` and optional ``weights`` ``[B]``; subclasses give ``student_logits(batch)``."""

    progress_keys = ("success/mean", "kl/reverse", "entropy/mean", "loss/total")

    @abc.abstractmethod
    def student_logits(self, batch: Batch) -> torch.Tensor:
        """``[B, T, V]`` logits of the student (with gradient) at the batch's positions."""

    def objective_name(self, step: int) -> str:
        """``then_loss`` from ``switch_step`` on (two-stage schedule), else ``loss``."""
        cfg: Any = self.config
        return cfg.then_loss if cfg.then_loss and step >= cfg.switch_step else cfg.loss

    def norm_length(self, batch: Batch) -> int:
        return self.config.norm_length or int(batch["response_mask"].shape[1])

    def compute_loss(self, batch: Batch, counts: GlobalCounts) -> tuple[torch.Tensor, Metrics, Batch]:
        cfg: Any = self.config  # DistillConfig or EnvDistillConfig
        logits = self.student_logits(batch)
        fn = OBJECTIVES[self.objective_name(self.step)]
        loss, raw = fn(
            logits,
            batch["teacher_logits"],
            batch["tokens"],
            batch["response_mask"],
            old_log_prob=batch["old_log_prob"],
            weights=batch.get("weights"),
            agg=cfg.agg,
            counts=counts,
            norm_length=self.norm_length(batch),
            chunk_size=cfg.chunk_size or None,
            checkpoint=cfg.recompute,
            **cfg.loss_options,
        )
        return loss, {k: float(v) for k, v in raw.items()}, {"logits": logits}

    def state_metrics(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> Metrics:
        """KL(S || T), KL(T || S) and student entropy, masked token means over the student's states."""
        chunk = getattr(self.config, "chunk_size", 0) or None
        m = mask.bool()
        n = m.float().sum().clamp(min=1)

        def mean(x: torch.Tensor) -> float:
            return float((x * m).sum() / n)

        return {
            "kl/reverse": mean(reverse_kl(student_logits, teacher_logits, chunk_size=chunk, mask=m)),
            "kl/forward": mean(forward_kl(student_logits, teacher_logits, chunk_size=chunk, mask=m)),
            "entropy/mean": mean(token_entropy(student_logits, chunk_size=chunk)),
        }
