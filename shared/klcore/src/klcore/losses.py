"""The built-in RL policy loss: PPO's clipped surrogate (registered as ``vanilla``).

Every policy loss in the registry has this signature, so trainers can swap them by name:
``fn(old_log_prob, log_prob, advantages, mask, *, agg, counts, norm_length, **options)`` with
``[B, T]`` tensors, returning ``(scalar loss, metrics)``. ``agg``, ``counts`` and ``norm_length`` are
passed to ``klcore.reduce.aggregate``.

A loss that needs statistics of the whole optimiser mini-batch (over every rank and micro-batch)
may carry a ``prepare`` attribute: ``prepare(old_log_prob, log_prob, advantages, mask, *,
accelerator, **options) -> dict[str, Tensor]`` with ``[rows, ...]`` values. ``GRPOTrainer`` calls
it once per mini-batch (current log-probs, no gradient) and passes each micro-batch its rows of
every value as a keyword argument of the loss call.
"""

from __future__ import annotations

import torch

from klcore import _checks
from klcore.errors import ConfigError
from klcore.reduce import GlobalCounts, aggregate


def check_policy_inputs(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Validate the four ``[B, T]`` inputs of a policy loss; return the mask as bool."""
    for name, t in (("old_log_prob", old_log_prob), ("log_prob", log_prob), ("advantages", advantages)):
        _checks.floating(t, name)
        _checks.exact_dims(t, name, 2, "[B, T]")
        _checks.same_shape(t, name, log_prob, "log_prob")
    return _checks.mask(mask, "mask", log_prob.shape, allow_empty=True)


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def ppo_clip_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) per token with r = exp(log_prob - old_log_prob).

    ``clip_high > clip_low`` is DAPO's clip-higher. Metrics (masked token means, detached):
    ``policy/clipfrac`` (tokens where the clipped branch is active), ``policy/approx_kl``
    (mean of old - new log-prob, k1), ``policy/ratio_mean``.
    """
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ConfigError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    m = check_policy_inputs(old_log_prob, log_prob, advantages, mask)
    # zero at padding, whose log-probs may be garbage: exp would overflow and 0 * inf poison the gradient
    log_ratio = torch.where(m, log_prob - old_log_prob.detach(), torch.zeros((), device=log_prob.device))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token, m, agg, counts=counts, norm_length=norm_length)
    with torch.no_grad():
        mf = m.float()
        metrics = {
            "policy/clipfrac": _masked_mean((clipped > unclipped).float(), mf),
            "policy/approx_kl": _masked_mean(-log_ratio, mf),
            "policy/ratio_mean": _masked_mean(ratio, mf),
        }
    return loss, metrics


__all__ = ["check_policy_inputs", "ppo_clip_loss"]
