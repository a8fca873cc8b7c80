"""Clip-Cov and KL-Cov policy losses (Cui et al. 2025, Eq. 11-14) with the reference code's semantics.

Both follow klcore's policy-loss convention ``fn(old_log_prob, log_prob, advantages, mask, *, agg,
counts, norm_length, **options) -> (loss, metrics)`` with ``[B, T]`` tensors.

Selection scope:

* ``scope="micro-batch"`` reproduces verl / PRIME-RL exactly: the covariance means, the token count
  ``N`` and the selection are computed on the tensors of this call.
* ``scope="global"`` (default) computes them over the whole optimiser mini-batch of every
  data-parallel rank: the trainer computes the selection once per mini-batch through the loss's
  ``prepare`` attribute and passes each micro-batch its rows as ``selected``; a direct call with
  ``accelerator=`` gathers the tensors of every rank. Clip-Cov's random draw is made on rank 0 and
  broadcast, so the selection does not depend on how the batch is split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from entropy_rl._distributed import broadcast_from_main, gather_rows
from entropy_rl._inputs import check_finite, check_tokens
from entropy_rl.covariance import centred_product
from klcore.errors import ConfigError, MaskError, NonFiniteError, ShapeError
from klcore.reduce import MODES, GlobalCounts, aggregate

if TYPE_CHECKING:
    from accelerate import Accelerator

SCOPES: tuple[str, ...] = ("global", "micro-batch")
Metrics = dict[str, torch.Tensor]


# --- option checks ---------------------------------------------------------------------------------


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ConfigError(
            f"ratio must be a fraction of tokens in (0, 1), got {ratio!r} "
            "(the original repo's k_percent is a percentage: k_percent 0.2 is ratio 0.002)"
        )


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ConfigError(f"{name} must be a pair of numbers, got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return lo, hi


def _check_common(scope: str, agg: str) -> None:
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    if agg not in MODES:
        raise ConfigError(f"agg must be one of {MODES}, got {agg!r}")


def _clip_cov_options(ratio: float, cov_bounds: Sequence[float], clip: Sequence[float]) -> tuple[float, float, float, float]:
    _check_ratio(ratio)
    lb, ub = _pair(cov_bounds, "cov_bounds")
    if not lb < ub:
        raise ConfigError(f"cov_bounds must be (low, high) with low < high, got {cov_bounds!r}")
    clip_low, clip_high = _pair(clip, "clip")
    if not (0 <= clip_low <= 1 and clip_high >= 0):
        raise ConfigError(f"clip must be (low, high) with 0 <= low <= 1 and high >= 0, got {clip!r}")
    return lb, ub, clip_low, clip_high


def _check_selected(selected: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(selected, torch.Tensor) or selected.shape != like.shape:
        raise MaskError(
            f"selected must be a [B, T] tensor of the log-probs' shape {tuple(like.shape)}, "
            f"got {getattr(selected, 'shape', type(selected).__name__)}"
        )
    return selected.to(device=like.device, dtype=torch.bool)


# --- PPO pieces ---------------------------------------------------------------------------------


def _log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # zero at padding, whose log-probs may be garbage: exp would overflow and 0 * inf poison the gradient
    return torch.where(valid, log_prob.float() - old_log_prob.detach().float(), torch.zeros((), device=log_prob.device))


def _weighted(per_token: torch.Tensor, weights: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """``per_token`` times the detached per-token ``weights`` (``[B, T]``, finite, >= 0 at valid tokens), if given."""
    if weights is None:
        return per_token
    if not isinstance(weights, torch.Tensor) or weights.shape != valid.shape:
        raise ShapeError(
            f"weights must be a [B, T] tensor of the log-probs' shape {tuple(valid.shape)}, "
            f"got {getattr(weights, 'shape', type(weights).__name__)}"
        )
    check_tokens({"weights": weights}, valid)
    w = weights.detach().float()
    if bool((w[valid] < 0).any()):
        raise ConfigError("weights must be >= 0 at valid tokens (importance-sampling weights are ratios)")
    return per_token * torch.where(valid, w, torch.zeros((), device=w.device))


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the 0/1 float mask ``m`` (detached)."""
    return (x.detach() * m).sum() / m.sum().clamp(min=1)


def _aggregate_checked(
    per_token: torch.Tensor,
    valid: torch.Tensor,
    agg: str,
    counts: GlobalCounts | None,
    norm_length: int | None,
    inputs: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``aggregate``; when it finds a non-finite value, name the input that caused it (checked only then)."""
    try:
        return aggregate(per_token, valid, agg, counts=counts, norm_length=norm_length)
    except NonFiniteError:
        for name, t in inputs.items():
            check_finite(t, valid, name)
        raise


def _check_log_ratio(log_ratio: torch.Tensor, valid: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """Raise ``NonFiniteError`` naming the input when ``log_prob - old_log_prob`` is not finite at a valid token.

    An infinite log-ratio would be hidden by the clip (``max`` picks the finite branch) or by ``exp``.
    """
    if bool(torch.isfinite(log_ratio.detach()).all()):  # zero off the mask (``_log_ratio``): no gather needed
        return
    for name in ("old_log_prob", "log_prob"):
        check_finite(inputs[name], valid, name)
    raise NonFiniteError("log_prob - old_log_prob is not finite at a valid token; check both log-probs")


def _ppo_branches(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    return -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)


# --- selections ---------------------------------------------------------------------------------


def _global(channels: list[torch.Tensor], accelerator: Accelerator | None) -> tuple[list[torch.Tensor], int]:
    """Every rank's rows of each ``[B, T]`` channel (float32; a bool channel comes back as 0/1)."""
    if accelerator is None or accelerator.num_processes == 1:
        return [c.detach() for c in channels], 0
    stacked, first = gather_rows(torch.stack([c.detach().float() for c in channels], -1), accelerator)
    return list(stacked.unbind(-1)), first


def _pick_clip_cov(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    ppo_clipped: torch.Tensor,
    *,
    ratio: float,
    bounds: tuple[float, float],
    generator: torch.Generator | None,
    accelerator: Accelerator | None,
) -> torch.Tensor:
    """The Clip-Cov draw on validated tensors (over every rank's rows with ``accelerator``)."""
    (lp, adv, v, pc), first = _global([log_prob, advantages, valid, ppo_clipped], accelerator)
    v_all, pc_all = v.bool(), pc.bool()
    cov = centred_product(lp, adv, v_all)
    candidates = v_all & ~pc_all & (cov > bounds[0]) & (cov < bounds[1])
    index = candidates.flatten().nonzero().squeeze(1)
    count = min(max(int(ratio * int(v_all.sum())), 1), index.numel())
    chosen = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if count:
        draw = torch.randperm(index.numel(), generator=generator)[:count].to(index.device)
        chosen[index[broadcast_from_main(draw, accelerator)]] = True
    rows, width = log_prob.shape
    return chosen.view_as(cov)[first : first + rows, :width]


def clip_cov_selection(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float = 2e-4,
    cov_bounds: Sequence[float] = (1.0, 5.0),
    clip: Sequence[float] = (1.0, 1.0),
    scope: str = "global",
    generator: torch.Generator | None = None,
    accelerator: Accelerator | None = None,
) -> torch.Tensor:
    """Clip-Cov's detached tokens, ``[B, T]`` bool.

    Candidates: valid tokens not clipped by PPO (``-A clip(rho) > -A rho``) whose covariance (Eq. 10)
    lies strictly inside ``cov_bounds``; ``min(max(int(ratio N), 1), #candidates)`` of them are drawn
    uniformly (``torch.randperm`` with ``generator`` over the candidates in row-major order, as verl).
    ``N`` counts valid tokens. With ``scope="global"`` and ``accelerator`` all of this is over every
    rank's tokens (every rank must call it) and rank 0's draw is used.
    """
    lb, ub, clip_low, clip_high = _clip_cov_options(ratio, cov_bounds, clip)
    _check_common(scope, "token-mean")
    valid = check_tokens({"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages}, mask)
    with torch.no_grad():
        unclipped, clipped = _ppo_branches(_log_ratio(old_log_prob, log_prob, valid), advantages, clip_low, clip_high)
        return _pick_clip_cov(
            log_prob, advantages, valid, (clipped > unclipped) & valid, ratio=ratio, bounds=(lb, ub),
            generator=generator, accelerator=accelerator if scope == "global" else None,
        )


def kl_cov_selection(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float = 2e-3,
    scope: str = "global",
    accelerator: Accelerator | None = None,
) -> torch.Tensor:
    """KL-Cov's penalised tokens, ``[B, T]`` bool: the ``max(1, int(ratio N))`` valid tokens with the
    largest covariance (Eq. 10; ``torch.topk`` over the valid tokens in row-major order, as verl)."""
    _check_ratio(ratio)
    _check_common(scope, "token-mean")
    valid = check_tokens({"log_prob": log_prob, "advantages": advantages}, mask)
    with torch.no_grad():
        return _pick_kl_cov(log_prob, advantages, valid, ratio, accelerator if scope == "global" else None)


def _pick_kl_cov(
    log_prob: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor, ratio: float, accelerator: Accelerator | None
) -> torch.Tensor:
    (lp, adv, v), first = _global([log_prob, advantages, valid], accelerator)
    v_all = v.bool()
    cov = centred_product(lp, adv, v_all)
    index = v_all.flatten().nonzero().squeeze(1)
    count = max(1, int(index.numel() * ratio))
    top = torch.topk(cov.flatten()[index], count, largest=True, sorted=False).indices
    chosen = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    chosen[index[top]] = True
    rows, width = log_prob.shape
    return chosen.view_as(cov)[first : first + rows, :width]


# --- losses ---------------------------------------------------------------------------------------


def clip_cov_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float = 2e-4,
    cov_bounds: Sequence[float] = (1.0, 5.0),
    clip: Sequence[float] = (1.0, 1.0),
    agg: str = "token-mean",
    scope: str = "global",
    generator: torch.Generator | None = None,
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
    accelerator: Accelerator | None = None,
    selected: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clip-Cov: PPO-clip ``max(-A rho, -A clip(rho, 1 - clip[0], 1 + clip[1]))`` per token, times 0 at
    the tokens of :func:`clip_cov_selection` (exactly zero gradient there), aggregated by ``agg``.

    ``selected`` (``[B, T]`` bool) overrides the selection (the trainer passes the mini-batch's);
    ``counts`` / ``norm_length`` go to ``klcore.reduce.aggregate``; ``weights`` (``[B, T]``, detached)
    multiply the per-token loss before aggregation (rollout importance-sampling corrections, as verl's
    ``rollout_is_weights`` and TRL's ``importance_sampling_ratio``; the selection ignores them).
    Metrics (token means over this call's valid tokens): ``cov/selected_frac`` (verl's ``actor/pg_clipfrac``), ``policy/clipfrac``
    (PPO-clipped), ``policy/approx_kl`` (k1), ``policy/ratio_mean``.
    """
    lb, ub, clip_low, clip_high = _clip_cov_options(ratio, cov_bounds, clip)
    _check_common(scope, agg)
    tensors = {"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages}
    valid = check_tokens(tensors, mask, finite=False)
    log_ratio = _log_ratio(old_log_prob, log_prob, valid)
    _check_log_ratio(log_ratio, valid, tensors)
    unclipped, clipped = _ppo_branches(log_ratio, advantages, clip_low, clip_high)
    ppo_clipped = (clipped.detach() > unclipped.detach()) & valid
    if selected is None:
        if not bool(valid.any()):
            raise MaskError("mask selects no token; Clip-Cov needs valid tokens to select from (or pass selected=)")
        selected = _pick_clip_cov(
            log_prob, advantages, valid, ppo_clipped, ratio=ratio, bounds=(lb, ub), generator=generator,
            accelerator=accelerator if scope == "global" else None,
        )
    keep = ~_check_selected(selected, log_prob)
    per_token = torch.where(keep, torch.maximum(unclipped, clipped), torch.zeros((), device=log_prob.device))
    per_token = _weighted(per_token, weights, valid)
    loss = _aggregate_checked(per_token, valid, agg, counts, norm_length, tensors)
    mf = valid.float()
    metrics = {
        "cov/selected_frac": _masked_mean((~keep).float(), mf),
        "policy/clipfrac": _masked_mean(ppo_clipped.float(), mf),
        "policy/approx_kl": _masked_mean(-log_ratio, mf),
        "policy/ratio_mean": _masked_mean(torch.exp(log_ratio.detach()), mf),
    }
    return loss, metrics


def kl_cov_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float = 2e-3,
    beta: float = 1.0,
    agg: str = "token-mean",
    scope: str = "global",
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
    accelerator: Accelerator | None = None,
    selected: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KL-Cov: unclipped ``-A rho`` per token plus ``beta |log rho|`` at the tokens of
    :func:`kl_cov_selection`, aggregated by ``agg`` (no PPO clip, as the reference).

    On the first, on-policy mini-batch of a rollout ``log rho = 0`` and the gradient of ``|x|`` at 0
    is 0, so the penalty does nothing there. ``weights`` as in :func:`clip_cov_loss`. Metrics: ``cov/selected_frac``, ``policy/abs_kl`` (mean
    ``|log rho|``, verl's ``actor/ppo_kl``), ``policy/approx_kl`` (k1), ``policy/ratio_mean``.
    """
    _check_ratio(ratio)
    _check_common(scope, agg)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"beta must be a finite number >= 0, got {beta!r}")
    tensors = {"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages}
    valid = check_tokens(tensors, mask, finite=False)
    if selected is None:
        if not bool(valid.any()):
            raise MaskError("mask selects no token; KL-Cov needs valid tokens to select from (or pass selected=)")
        selected = _pick_kl_cov(log_prob, advantages, valid, ratio, accelerator if scope == "global" else None)
    penalised = _check_selected(selected, log_prob)
    log_ratio = _log_ratio(old_log_prob, log_prob, valid)
    _check_log_ratio(log_ratio, valid, tensors)
    policy_gradient = -advantages.detach().float() * torch.exp(log_ratio)
    per_token = torch.where(penalised, policy_gradient + beta * log_ratio.abs(), policy_gradient)
    per_token = _weighted(per_token, weights, valid)
    loss = _aggregate_checked(per_token, valid, agg, counts, norm_length, tensors)
    mf = valid.float()
    metrics = {
        "cov/selected_frac": _masked_mean(penalised.float(), mf),
        "policy/abs_kl": _masked_mean(log_ratio.abs(), mf),
        "policy/approx_kl": _masked_mean(-log_ratio, mf),
        "policy/ratio_mean": _masked_mean(torch.exp(log_ratio.detach()), mf),
    }
    return loss, metrics


# --- mini-batch preparation (klcore's trainer calls `loss_fn.prepare` once per optimiser mini-batch) ---


def _prepare_clip_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    accelerator: Accelerator | None = None,
    scope: str = "global",
    ratio: float = 2e-4,
    cov_bounds: Sequence[float] = (1.0, 5.0),
    clip: Sequence[float] = (1.0, 1.0),
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    if scope != "global":
        _check_common(scope, "token-mean")
        return {}
    return {
        "selected": clip_cov_selection(
            old_log_prob, log_prob, advantages, mask, ratio=ratio, cov_bounds=cov_bounds, clip=clip,
            scope=scope, generator=generator, accelerator=accelerator,
        )
    }


def _prepare_kl_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    accelerator: Accelerator | None = None,
    scope: str = "global",
    ratio: float = 2e-3,
    beta: float = 1.0,
) -> dict[str, Any]:
    if scope != "global":
        _check_common(scope, "token-mean")
        return {}
    return {"selected": kl_cov_selection(log_prob, advantages, mask, ratio=ratio, scope=scope, accelerator=accelerator)}


clip_cov_loss.prepare = _prepare_clip_cov  # type: ignore[attr-defined]
kl_cov_loss.prepare = _prepare_kl_cov  # type: ignore[attr-defined]

__all__ = ["SCOPES", "clip_cov_loss", "clip_cov_selection", "kl_cov_loss", "kl_cov_selection"]
