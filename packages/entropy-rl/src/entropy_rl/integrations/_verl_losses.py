"""verl policy losses around entropy_rl (imports verl and registers on import; private)."""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from entropy_rl.losses import clip_cov_loss, kl_cov_loss
from klcore.errors import ConfigError


def _refuse_is_weights(weights: torch.Tensor | None) -> None:
    if weights is not None:
        raise ConfigError(
            "entropy_rl's verl losses do not apply rollout importance-sampling weights (rollout_is_weights); "
            "turn rollout importance sampling off or use verl's own clip_cov / kl_cov"
        )


def _get(config: Any, name: str, default: float) -> float:
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else float(value)


@register_policy_loss("clip_cov_klcore")
def verl_clip_cov(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean", config: Any = None, rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss signature around :func:`entropy_rl.clip_cov_loss` (scope micro-batch)."""
    _refuse_is_weights(rollout_is_weights)
    pl = getattr(config, "policy_loss", None)
    clip = _get(config, "clip_ratio", 0.2)
    loss, metrics = clip_cov_loss(
        old_log_prob, log_prob, advantages, response_mask, agg=loss_agg_mode, scope="micro-batch",
        ratio=_get(pl, "clip_cov_ratio", 2e-4), cov_bounds=(_get(pl, "clip_cov_lb", 1.0), _get(pl, "clip_cov_ub", 5.0)),
        clip=(_get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)),
    )
    return loss, {"actor/pg_clipfrac": metrics["cov/selected_frac"].item(), "actor/ppo_kl": metrics["policy/approx_kl"].item()}


@register_policy_loss("kl_cov_klcore")
def verl_kl_cov(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean", config: Any = None, rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss signature around :func:`entropy_rl.kl_cov_loss` (scope micro-batch)."""
    _refuse_is_weights(rollout_is_weights)
    pl = getattr(config, "policy_loss", None)
    loss, metrics = kl_cov_loss(
        old_log_prob, log_prob, advantages, response_mask, agg=loss_agg_mode, scope="micro-batch",
        ratio=_get(pl, "kl_cov_ratio", 2e-4), beta=_get(pl, "ppo_kl_coef", 0.1),
    )
    return loss, {"actor/ppo_kl": metrics["policy/abs_kl"].item()}


