"""verl policy losses around entropy_rl (imports verl and registers on import; private).

verl calls a policy loss once per micro-batch with ``config.global_batch_info`` (``dp_size``,
``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``) set by its worker; the losses here
aggregate with those denominators exactly as verl's ``agg_loss`` does, for every ``loss_agg_mode``.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from entropy_rl.losses import clip_cov_loss, kl_cov_loss
from klcore.errors import ConfigError
from klcore.reduce import GlobalCounts

#: verl's ``loss_agg_mode`` values; ``token-sum`` is aggregated as a token mean over one "token"
AGG_MODES: tuple[str, ...] = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                              "seq-mean-token-sum-norm")


def _get(config: Any, name: str, default: float) -> float:
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else float(value)


def _number(value: Any) -> float | None:
    return None if value is None else float(value.item() if isinstance(value, torch.Tensor) else value)


def aggregation(config: Any, mask: torch.Tensor, loss_agg_mode: str) -> dict[str, Any]:
    """``agg`` / ``counts`` / ``norm_length`` keywords of an entropy_rl loss that reproduce verl's ``agg_loss``
    under ``config.global_batch_info`` (local counts where verl uses them: a missing entry with ``dp_size`` 1)."""
    if loss_agg_mode not in AGG_MODES:
        raise ConfigError(f"loss_agg_mode must be one of {AGG_MODES} (verl's modes), got {loss_agg_mode!r}")
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = int(info.get("dp_size") or 1)
    tokens, sequences = _number(info.get("batch_num_tokens")), _number(info.get("global_batch_size"))
    scale = info.get("loss_scale_factor")
    needs = {"token-mean": ("batch_num_tokens", tokens)}.get(loss_agg_mode, ("global_batch_size", sequences))
    if dp_size > 1 and loss_agg_mode != "token-sum" and needs[1] is None:
        raise ConfigError(f"global_batch_info has dp_size={dp_size} but no {needs[0]}: {loss_agg_mode} needs the "
                          "global count (verl's worker sets it; set it when calling the loss by hand)")
    valid = mask.bool()
    counts = GlobalCounts(
        tokens=1.0 if loss_agg_mode == "token-sum" else (tokens if tokens is not None else float(valid.sum())),
        sequences=sequences if sequences is not None else float(valid.any(-1).sum()),
        world_size=dp_size,
    )
    agg = "token-mean" if loss_agg_mode == "token-sum" else loss_agg_mode
    norm_length = None if scale is None else int(scale)
    return {"agg": agg, "counts": counts, "norm_length": norm_length}


@register_policy_loss("clip_cov_klcore")
def verl_clip_cov(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean", config: Any = None, rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss signature around :func:`entropy_rl.clip_cov_loss` (selection in micro-batch scope)."""
    pl = getattr(config, "policy_loss", None)
    clip = _get(config, "clip_ratio", 0.2)
    loss, metrics = clip_cov_loss(
        old_log_prob, log_prob, advantages, response_mask, scope="micro-batch", weights=rollout_is_weights,
        ratio=_get(pl, "clip_cov_ratio", 2e-4), cov_bounds=(_get(pl, "clip_cov_lb", 1.0), _get(pl, "clip_cov_ub", 5.0)),
        clip=(_get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)),
        **aggregation(config, response_mask, loss_agg_mode),
    )
    return loss, {"actor/pg_clipfrac": metrics["cov/selected_frac"].item(), "actor/ppo_kl": metrics["policy/approx_kl"].item()}


@register_policy_loss("kl_cov_klcore")
def verl_kl_cov(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean", config: Any = None, rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss signature around :func:`entropy_rl.kl_cov_loss` (selection in micro-batch scope)."""
    pl = getattr(config, "policy_loss", None)
    loss, metrics = kl_cov_loss(
        old_log_prob, log_prob, advantages, response_mask, scope="micro-batch", weights=rollout_is_weights,
        ratio=_get(pl, "kl_cov_ratio", 2e-4), beta=_get(pl, "ppo_kl_coef", 0.1),
        **aggregation(config, response_mask, loss_agg_mode),
    )
    return loss, {"actor/ppo_kl": metrics["policy/abs_kl"].item()}
