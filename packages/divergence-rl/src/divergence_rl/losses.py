"""The DPH-RL loss terms as functions: the rehearsal term, and the hybrid loss of a mixed batch.

``L = L_exp + eta * L_pef``: ``L_exp`` is a policy loss (no KL) on exploration rows, ``L_pef`` the
token-mean of f(exp(log pi_theta - stored log pi_ref)) on rehearsal rows. In a batch that mixes both
kinds of rows, :func:`hybrid_loss` routes every row by its own flag (the reference code switches a
whole micro-batch on its first row's type, which mis-trains mixed micro-batches).

Two weightings (``WEIGHTINGS``): ``additive`` is the formula above; ``rows`` is the reference code's
effective loss, ``(1 - p) L_exp + p eta L_pef`` with ``p = R / (N + R)`` the share of rehearsal rows
among the ``N`` online and ``R`` rehearsal rows (it appends the stored rows to the batch and averages
micro-batch losses), so that ``eta`` is on the scale of its ``sft_loss_coeff``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from divergence_rl.generators import check_kind, f_values
from klcore.errors import ConfigError, DataError, DTypeError, MaskError, NonFiniteError, ShapeError
from klcore.losses import ppo_clip_loss
from klcore.reduce import GlobalCounts, aggregate


def _same_shape(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}; both are "
                         "per-token [B, T] tensors of the same responses")


#: ``additive``: L_exp + eta L_pef; ``rows``: (1 - p) L_exp + p eta L_pef, p = rehearsal rows / all rows
WEIGHTINGS = ("additive", "rows")


def check_weighting(weighting: object) -> str:
    """``weighting`` if it is one of ``WEIGHTINGS``, else ``ConfigError``."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)} (additive: L_exp + eta D; rows: the "
                          f"reference code's (1 - p) L_exp + p eta D, p the rehearsal rows' share), got {weighting!r}")
    return str(weighting)


def rehearsal_share(rehearsal_rows: float, online_rows: float) -> float:
    """``p = R / (N + R)``: the rehearsal rows' share of a batch of ``N`` online and ``R`` rehearsal rows."""
    if rehearsal_rows < 0 or online_rows < 0 or rehearsal_rows + online_rows <= 0:
        raise ConfigError(f"need row counts >= 0 with a positive total, got rehearsal {rehearsal_rows}, "
                          f"online {online_rows}")
    return float(rehearsal_rows) / float(rehearsal_rows + online_rows)


def _float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DTypeError(f"{name} must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() != 2:
        raise ShapeError(f"{name} must be a per-token [B, T] tensor, got shape {tuple(x.shape)}")
    return x


def check_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor of ``like``'s shape; ``None`` means every position is valid. Raises
    ``ShapeError`` for another shape and ``MaskError`` for values other than 0 and 1 (a soft weight is not
    a mask)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"mask must be a boolean or 0/1 tensor of shape {tuple(like.shape)} (or None: every token "
                        f"valid), got {type(mask).__name__}")
    _same_shape(like, "log_prob", mask, "mask")
    if mask.dtype == torch.bool:
        return mask
    binary = (mask == 0) | (mask == 1)
    if not bool(binary.all()):
        odd = mask[~binary].flatten()[:3].tolist()
        raise MaskError(f"mask must hold only 0 and 1 (or be boolean), got values such as {odd}; weight tokens "
                        "through the loss, not the mask")
    return mask != 0


def check_eta(eta: object) -> float:
    """``eta`` as a float if it is a finite number >= 0, else ``ConfigError``."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ConfigError(f"eta must be a finite number >= 0 (0 switches the rehearsal term off), got {eta!r}")
    return float(eta)


def _finite_where(x: torch.Tensor, keep: torch.Tensor, name: str, hint: str) -> None:
    bad = keep & ~torch.isfinite(x.detach())
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise NonFiniteError(f"{name} is {x[where].item()} at valid position {where} (row, token); {hint}")


def rehearsal_loss(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    kind: str = "js",
    eta: float = 0.2,
    alpha: float = 0.2,
    agg: str = "token-mean",
    counts: GlobalCounts | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``eta * agg f(exp(log_prob - ref_log_prob))`` over ``mask``; ``[B, T]`` inputs, float32 scalar.

    ``ref_log_prob`` are the stored initial-policy log-probs of the same tokens. ``mask`` is boolean or
    0/1 (``None``: every token valid); outside it both log-probs may hold anything, NaN included (no
    value or gradient comes from there). Inside it both must be finite (``NonFiniteError``). ``counts``
    (from ``klcore.reduce.global_counts`` of the whole rehearsal batch) makes the result one
    micro-batch's share. Metrics: ``dph/divergence`` (the aggregate without ``eta``, detached).
    """
    check_kind(kind)
    eta = check_eta(eta)
    _float_tensor(log_prob, "log_prob")
    _float_tensor(ref_log_prob, "ref_log_prob")
    _same_shape(log_prob, "log_prob", ref_log_prob, "ref_log_prob")
    keep = check_mask(mask, log_prob)
    _finite_where(ref_log_prob, keep, "ref_log_prob",
                  "a stored log-prob must be finite (the initial policy sampled that token, so its probability "
                  "is > 0): the store is damaged or the rows are misaligned; pre-sample again")
    _finite_where(log_prob, keep, "log_prob", "check the policy's forward pass (overflow in half precision?)")
    # padding: log-ratio zero (f = 0) through a where, so NaN there reaches neither the value nor the gradient
    ratio = torch.where(keep, log_prob.float() - ref_log_prob.float(), torch.zeros((), device=log_prob.device))
    values = f_values(ratio, kind, alpha=alpha)
    divergence = aggregate(values, keep, agg, counts=counts)
    return eta * divergence, {"dph/divergence": divergence.detach()}


def verl_rehearsal_flags(types: torch.Tensor) -> torch.Tensor:
    """``is_rehearsal`` ``[B]`` bool from the reference code's ``data['type']`` (1: online row, 2: stored
    rehearsal row); ``DataError`` for any other value."""
    if not isinstance(types, torch.Tensor) or types.dim() != 1 or types.is_floating_point() or types.is_complex():
        raise DTypeError(f"types must be a [B] integer tensor of 1 (online) and 2 (rehearsal), got "
                         f"{type(types).__name__} {getattr(types, 'dtype', '')} {tuple(getattr(types, 'shape', ()))}")
    odd = sorted(set(types.unique().tolist()) - {1, 2})
    if odd:
        raise DataError(f"types must hold only 1 (online) and 2 (rehearsal) as in verl's DPH-RL batches, got {odd}")
    return types == 2


def hybrid_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    ref_log_prob: torch.Tensor,
    mask: torch.Tensor | None,
    is_rehearsal: torch.Tensor,
    *,
    kind: str = "js",
    eta: float = 0.2,
    alpha: float = 0.2,
    policy_loss: Callable[..., tuple[torch.Tensor, dict[str, Any]]] = ppo_clip_loss,
    policy_options: dict[str, Any] | None = None,
    agg: str = "token-mean",
    counts: tuple[GlobalCounts, GlobalCounts] | None = None,
    weighting: str = "additive",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPH-RL loss of a batch mixing exploration and rehearsal rows, routed per row.

    ``is_rehearsal`` ``[B]`` marks rehearsal rows: they get ``eta * f`` against ``ref_log_prob``
    (their ``advantages`` / ``old_log_prob`` are ignored); the other rows get ``policy_loss``
    (called like ``klcore.losses.ppo_clip_loss``; ``ref_log_prob`` ignored). Each part is
    aggregated over its own tokens. With micro-batches, pass ``counts = (exploration_counts,
    rehearsal_counts)`` from the whole mini-batch: then a micro-batch may lack either kind of row.
    ``weighting``: ``additive`` (``L_exp + eta D``) or ``rows`` (``(1 - p) L_exp + p eta D``, ``p`` the
    rehearsal rows' share: rows with a valid token, of the whole mini-batch when ``counts`` is given);
    metric ``dph/rehearsal_share`` = p. ``is_rehearsal`` must be a bool tensor: the reference code's ``data['type']`` (1 online, 2 rehearsal)
    is refused (``DTypeError``), since read as flags it marks every row; pass
    ``verl_rehearsal_flags(data['type'])``. ``mask`` as for :func:`rehearsal_loss` (``None``: all valid).
    """
    _float_tensor(log_prob, "log_prob")
    check_weighting(weighting)
    keep = check_mask(mask, log_prob)
    if not isinstance(is_rehearsal, torch.Tensor) or is_rehearsal.dtype != torch.bool:
        raise DTypeError(f"is_rehearsal must be a [B] bool tensor, got {type(is_rehearsal).__name__} "
                         f"{getattr(is_rehearsal, 'dtype', '')}; integer row types are ambiguous (verl's data['type'] "
                         "holds 1 for online rows and 2 for rehearsal rows): pass verl_rehearsal_flags(data['type']) "
                         "or a comparison such as types == 2")
    if is_rehearsal.dim() != 1 or is_rehearsal.shape[0] != keep.shape[0]:
        raise ShapeError(f"is_rehearsal must be [B] = [{keep.shape[0]}] (one flag per row), got "
                         f"{tuple(is_rehearsal.shape)}")
    rows = is_rehearsal.to(keep.device)[:, None]
    explore_mask, rehearse_mask = keep & ~rows, keep & rows
    # the policy loss sees no value of a rehearsal row or of padding (they may hold anything, NaN included)
    advantages = torch.where(explore_mask, advantages, torch.zeros((), dtype=advantages.dtype,
                                                                   device=advantages.device))
    old_log_prob = torch.where(explore_mask, old_log_prob, log_prob.detach().to(old_log_prob.dtype))
    if counts is None and not explore_mask.any() and not rehearse_mask.any():
        raise MaskError("the mask selects no token of either kind of row; pass at least one valid token")
    explore_counts, rehearse_counts = counts if counts is not None else (None, None)
    if counts is not None:
        share = rehearsal_share(counts[1].sequences, counts[0].sequences)
    else:
        share = rehearsal_share(float(rehearse_mask.any(-1).sum()), float(explore_mask.any(-1).sum()))
    explore_weight, rehearse_weight = (1.0 - share, share) if weighting == "rows" else (1.0, 1.0)
    total = log_prob.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {"dph/rehearsal_rows": rows.float().mean(),
                                        "dph/rehearsal_share": torch.tensor(share)}
    if counts is not None or explore_mask.any():
        loss, raw = policy_loss(old_log_prob, log_prob, advantages, explore_mask, agg=agg, counts=explore_counts,
                                **(policy_options or {}))
        total = total + explore_weight * loss
        metrics.update({k: torch.as_tensor(v) for k, v in raw.items()})
    if counts is not None or rehearse_mask.any():
        loss, raw = rehearsal_loss(log_prob, ref_log_prob, rehearse_mask, kind=kind, eta=eta, alpha=alpha, agg=agg,
                                   counts=rehearse_counts)
        total = total + rehearse_weight * loss
        metrics.update(raw)
    return total, metrics


__all__ = ["WEIGHTINGS", "check_eta", "check_mask", "check_weighting", "hybrid_loss", "rehearsal_loss",
           "rehearsal_share", "verl_rehearsal_flags"]
