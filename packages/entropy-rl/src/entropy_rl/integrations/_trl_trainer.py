"""Implementation of :class:`entropy_rl.integrations.trl.CovGRPOTrainer` (imports trl; private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from trl import GRPOTrainer

from entropy_rl.losses import clip_cov_loss, kl_cov_loss
from klcore.errors import ConfigError

LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "clip_cov": clip_cov_loss,
    "kl_cov": kl_cov_loss,
}


class CovGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` whose policy loss is Clip-Cov or KL-Cov; other arguments go to TRL unchanged.

    ``cov_loss``: ``"clip_cov"`` or ``"kl_cov"``; ``cov_options``: keyword options of that loss
    (``ratio``, ``cov_bounds``, ``clip``, ``beta``, ``scope``). Metrics ``cov/selected_frac``,
    ``policy/...`` are logged with TRL's metrics.
    """

    def __init__(self, *args: Any, cov_loss: str = "clip_cov", cov_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if cov_loss not in LOSSES:
            raise ConfigError(f"cov_loss must be one of {sorted(LOSSES)}, got {cov_loss!r}")
        self.cov_loss = cov_loss
        self.cov_options = dict(cov_options or {})
        for reserved in ("agg", "counts", "accelerator", "selected"):
            if reserved in self.cov_options:
                raise ConfigError(f"cov_options may not set {reserved!r}; the trainer provides it")
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            raise ConfigError(f"CovGRPOTrainer needs GRPOConfig(beta=0.0) (no reference KL), got beta={self.beta}")

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        log_prob, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1)
        )
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        advantages = advantages.expand_as(log_prob)
        old = inputs.get("old_per_token_logps")
        old = log_prob.detach() if old is None else old
        loss, metrics = LOSSES[self.cov_loss](
            old, log_prob, advantages, mask.bool(), agg="token-mean", accelerator=self.accelerator, **self.cov_options
        )
        mode = "train" if model.training else "eval"
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather(value.detach().reshape(1)).mean().item())
        return loss


__all__ = ["CovGRPOTrainer"]
