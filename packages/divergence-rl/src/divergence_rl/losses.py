"""The DPH-RL loss terms as functions: the rehearsal term, and the hybrid loss of a mixed batch.

``L = L_exp + eta * L_pef``: ``L_exp`` is a policy loss (no KL) on exploration rows, ``L_pef`` the
token-mean of f(exp(log pi_theta - stored log pi_ref)) on rehearsal rows. In a batch that mixes both
kinds of rows, :func:`hybrid_loss` routes every row by its own flag (the reference code switches a
whole micro-batch on its first row's type, which mis-trains mixed micro-batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from divergence_rl.generators import check_kind, f_values
from klcore.errors import MaskError, ShapeError
from klcore.losses import ppo_clip_loss
from klcore.reduce import GlobalCounts, aggregate


def _same_shape(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}; both are "
                         "per-token [B, T] tensors of the same responses")


def rehearsal_loss(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "js",
    eta: float = 0.2,
    alpha: float = 0.2,
    agg: str = "token-mean",
    counts: GlobalCounts | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``eta * agg f(exp(log_prob - ref_log_prob))`` over ``mask``; ``[B, T]`` inputs, float32 scalar.

    ``ref_log_prob`` are the stored initial-policy log-probs of the same tokens. ``counts`` (from
    ``klcore.reduce.global_counts`` of the whole rehearsal batch) makes the result one micro-batch's
    share. Metrics: ``dph/divergence`` (the aggregate without ``eta``, detached).
    """
    check_kind(kind)
    _same_shape(log_prob, "log_prob", ref_log_prob, "ref_log_prob")
    _same_shape(log_prob, "log_prob", mask, "mask")
    keep = mask.bool()
    safe_ref = torch.where(keep, ref_log_prob.float(), log_prob.detach().float())  # padding: ratio one, f = 0
    values = f_values(log_prob.float() - safe_ref, kind, alpha=alpha)
    divergence = aggregate(values, keep, agg, counts=counts)
    return eta * divergence, {"dph/divergence": divergence.detach()}


def hybrid_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    ref_log_prob: torch.Tensor,
    mask: torch.Tensor,
    is_rehearsal: torch.Tensor,
    *,
    kind: str = "js",
    eta: float = 0.2,
    alpha: float = 0.2,
    policy_loss: Callable[..., tuple[torch.Tensor, dict[str, Any]]] = ppo_clip_loss,
    policy_options: dict[str, Any] | None = None,
    agg: str = "token-mean",
    counts: tuple[GlobalCounts, GlobalCounts] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPH-RL loss of a batch mixing exploration and rehearsal rows, routed per row.

    ``is_rehearsal`` ``[B]`` marks rehearsal rows: they get ``eta * f`` against ``ref_log_prob``
    (their ``advantages`` / ``old_log_prob`` are ignored); the other rows get ``policy_loss``
    (called like ``klcore.losses.ppo_clip_loss``; ``ref_log_prob`` ignored). Each part is
    aggregated over its own tokens. With micro-batches, pass ``counts = (exploration_counts,
    rehearsal_counts)`` from the whole mini-batch: then a micro-batch may lack either kind of row.
    """
    _same_shape(log_prob, "log_prob", mask, "mask")
    if is_rehearsal.dim() != 1 or is_rehearsal.shape[0] != mask.shape[0]:
        raise ShapeError(f"is_rehearsal must be [B] = [{mask.shape[0]}] (one flag per row), got "
                         f"{tuple(is_rehearsal.shape)}")
    rows = is_rehearsal.bool().to(mask.device)[:, None]
    explore_mask, rehearse_mask = mask.bool() & ~rows, mask.bool() & rows
    explore_counts, rehearse_counts = counts if counts is not None else (None, None)
    total = log_prob.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {"dph/rehearsal_rows": rows.float().mean()}
    if counts is None and not explore_mask.any() and not rehearse_mask.any():
        raise MaskError("the mask selects no token of either kind of row; pass at least one valid token")
    if counts is not None or explore_mask.any():
        loss, raw = policy_loss(old_log_prob, log_prob, advantages, explore_mask, agg=agg, counts=explore_counts,
                                **(policy_options or {}))
        total = total + loss
        metrics.update({k: torch.as_tensor(v) for k, v in raw.items()})
    if counts is not None or rehearse_mask.any():
        loss, raw = rehearsal_loss(log_prob, ref_log_prob, rehearse_mask, kind=kind, eta=eta, alpha=alpha, agg=agg,
                                   counts=rehearse_counts)
        total = total + loss
        metrics.update(raw)
    return total, metrics


__all__ = ["hybrid_loss", "rehearsal_loss"]
