"""DPO-family preference losses on offline pairs, with TRL's per-sequence definitions.

All inputs are ``[B]`` sequence log-probabilities (sums over completion tokens, float, nats). With
``Δ = (π_c - ref_c) - (π_r - ref_r)``, ``β = beta`` and ``ε = label_smoothing``:

* ``sigmoid``: ``-(1 - ε) log σ(βΔ) - ε log σ(-βΔ)`` (TRL ``sigmoid``; ε > 0 is conservative DPO, cDPO);
* ``hinge``: ``max(0, 1 - βΔ)`` (TRL ``hinge``);
* ``ipo``: ``(Δ̄ - 1 / (2β))²`` with Δ̄ from per-token averaged log-ratios (TRL ``ipo``; needs lengths);
* ``robust``: ``(-(1 - ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``, ε in [0, 0.5) (TRL ``robust``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from klcore.errors import ConfigError, DTypeError, NonFiniteError, ShapeError

KINDS = ("sigmoid", "hinge", "ipo", "robust")
#: registry / ``HyPOConfig.loss`` name -> DPO loss kind (TRL's ``loss_type``)
OBJECTIVES = {f"dpo-{kind}": kind for kind in KINDS}
#: keywords of klcore's RL policy-loss call (``GRPOTrainer``); a preference objective never takes them
POLICY_LOSS_KEYWORDS = ("agg", "counts", "norm_length")


def _check_vector(x: object, name: str, shape: torch.Size | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor of sequence log-probs, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DTypeError(f"{name} must be a floating tensor of log-probs, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ShapeError(f"{name} must be [B] (one summed log-prob per pair), got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ShapeError(f"{name} has shape {tuple(x.shape)} but policy_chosen_logps has {tuple(shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).nonzero()[0, 0])
        raise NonFiniteError(f"{name} holds a non-finite value at pair {bad} ({float(x[bad])}); check the inputs")
    return x.float()


def check_options(kind: str, beta: float, label_smoothing: float) -> None:
    """Raise ``ConfigError`` unless ``kind`` is in ``KINDS``, ``beta`` is finite and > 0 and
    ``label_smoothing`` is valid for ``kind``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown DPO loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta must be a finite positive number, got {beta!r}")
    eps = label_smoothing
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ConfigError(f"label_smoothing must be a finite number, got {eps!r}")
    if kind in ("hinge", "ipo") and eps != 0:
        raise ConfigError(f"label_smoothing is not defined for the {kind!r} loss (got {eps}); leave it at 0")
    if kind == "robust" and not 0 <= eps < 0.5:
        raise ConfigError(f"the robust loss needs label_smoothing in [0, 0.5), got {eps}")
    if kind == "sigmoid" and not 0 <= eps <= 0.5:
        raise ConfigError(f"the sigmoid (cDPO) loss needs label_smoothing in [0, 0.5], got {eps}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses ``[B]`` (float32) and metrics of one DPO-family objective.

    ``chosen_lengths`` / ``rejected_lengths`` (``[B]`` completion token counts) are needed by ``ipo``
    only, which averages the log-ratios per token as TRL does. Metrics: ``rewards/chosen`` and
    ``rewards/rejected`` (mean implicit rewards β(π - ref)), ``rewards/margin`` (their mean
    difference), ``rewards/accuracy`` (fraction of pairs with chosen reward > rejected reward).
    """
    check_options(kind, beta, label_smoothing)
    pc = _check_vector(policy_chosen_logps, "policy_chosen_logps", None)
    pr = _check_vector(policy_rejected_logps, "policy_rejected_logps", pc.shape)
    rc = _check_vector(ref_chosen_logps, "ref_chosen_logps", pc.shape)
    rr = _check_vector(ref_rejected_logps, "ref_rejected_logps", pc.shape)
    if pc.numel() == 0:
        raise ShapeError("dpo_loss got zero pairs; pass at least one (chosen, rejected) pair")
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    delta = chosen_ratio - rejected_ratio
    eps = float(label_smoothing)
    if kind == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ConfigError(
                "the ipo loss averages log-ratios per completion token (as TRL does); "
                "pass chosen_lengths and rejected_lengths ([B] token counts)"
            )
        lc = _check_vector(torch.as_tensor(chosen_lengths).float(), "chosen_lengths", pc.shape).clamp(min=1)
        lr = _check_vector(torch.as_tensor(rejected_lengths).float(), "rejected_lengths", pc.shape).clamp(min=1)
        losses = (chosen_ratio / lc.to(pc.device) - rejected_ratio / lr.to(pc.device) - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        metrics = {
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/margin": float((chosen_rewards - rejected_rewards).mean()),
            "rewards/accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        }
    return losses, metrics


def preference_objective(kind: str) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """``dpo_loss`` with ``kind`` fixed: the component filed as ``dpo-<kind>`` in klcore's ``loss`` registry.

    Called with klcore's policy-loss keywords (``agg``, ``counts``, ``norm_length``), i.e. from
    ``GRPOTrainer``, it raises ``ConfigError``: it is a preference objective for ``HyPOTrainer``.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown DPO loss kind {kind!r}; choose one of {', '.join(KINDS)}")

    def objective(*args: torch.Tensor, **options: object) -> tuple[torch.Tensor, dict[str, float]]:
        policy_keys = [k for k in POLICY_LOSS_KEYWORDS if k in options]
        if policy_keys:
            raise ConfigError(
                f"'dpo-{kind}' is a preference objective on (chosen, rejected) sequence log-probs for "
                f"hypo.HyPOTrainer, not an RL policy loss (it was called with {', '.join(policy_keys)}); "
                "use HyPOTrainer for it, or pick a policy loss (e.g. 'vanilla') for GRPOTrainer"
            )
        return dpo_loss(*args, kind=kind, **options)  # type: ignore[arg-type]

    return objective


__all__ = ["KINDS", "dpo_loss"]
