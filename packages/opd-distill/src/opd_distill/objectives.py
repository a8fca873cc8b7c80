"""Distillation objectives between a student and a frozen teacher on the student's own samples.

Two families, all returning ``(scalar loss, metrics)`` and aggregated with ``klcore.reduce``:

* sampled-token (VLA-OPD, Eq. 6-7): the reward r_t = -(log S(a_t) - log T(a_t)) of the taken token,
  with stop-gradient, used raw as the per-token advantage (no group normalisation, no reward-to-go).
  ``opd_reinforce_loss`` recomputes r_t with the current student (its expected gradient is the
  gradient of -KL(S || T)); ``opd_ppo_loss`` freezes r_t at rollout time and clips the ratio.
* full-vocabulary: reverse KL(S || T), forward KL(T || S) and GKD's generalised JSD(beta) through
  ``klcore.divergences`` (chunked, float32 accumulation, no float32 ``[B, T, V]`` copy), and hard
  cross-entropy -log S(argmax T), the baseline the VLA-OPD paper compares with.

Every loss takes optional per-row ``weights`` ``[B]`` (PACED problem weights, see
``opd_distill.paced``) that multiply each row's per-token values before aggregation.
``OBJECTIVES`` maps the registered names (``opd_reinforce``, ``opd_ppo``, ``full_reverse_kl``,
``full_forward_kl``, ``full_jsd``, ``hard_ce``) to adapters with one signature on logits, which is what
``DistillTrainer`` calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from klcore import divergences
from klcore.errors import ConfigError, DTypeError, MaskError, ShapeError, VocabMismatchError
from klcore.logprobs import token_logprobs
from klcore.losses import check_policy_inputs, ppo_clip_loss
from klcore.reduce import GlobalCounts, aggregate

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
OPTIONS = ("beta", "clip_low", "clip_high")


def check_vocab(student_vocab: int, teacher_vocab: int, *, tokenizer_vocab: int = 0) -> None:
    """Raise ``VocabMismatchError`` unless student and teacher score the same vocabulary.

    ``tokenizer_vocab`` > 0: heads that differ only by padding rows beyond the tokenizer's vocabulary
    (Qwen2.5-7B's 152064 against 0.5B's 151936 rows for 151665 tokens) are compared up to it when the
    caller slices them (``DistillConfig.slice_vocab``); otherwise the message says so.
    """
    s, t, k = int(student_vocab), int(teacher_vocab), int(tokenizer_vocab)
    if s == t:
        return
    if k and min(s, t) >= k:
        raise VocabMismatchError(
            f"the student's output head has {s} rows and the teacher's {t}, both covering the tokenizer's {k} "
            "tokens (the rest is padding): set slice_vocab=True to compare the logits of those tokens only"
        )
    raise VocabMismatchError(
        f"the student's vocabulary has {s} tokens but the teacher's has {t}; on-policy distillation compares "
        "both distributions token by token, so use a teacher and student with the same tokenizer / action "
        "vocabulary (same output head size)"
    )


def _row_weights(weights: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor | None:
    """Validate ``[B]`` weights and return them as a ``[B, 1]`` float32 column (None: unweighted)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise DTypeError(f"weights must be a floating-point tensor of shape [B], got {weights!r}")
    if tuple(weights.shape) != (rows,):
        raise ShapeError(f"weights has shape {tuple(weights.shape)} but must be [B] = ({rows},), one per row")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ConfigError("weights must be finite and >= 0 (PACED weights p^a (1-p)^b are); check the pass rates")
    return weights.detach().float().to(device)[:, None]


def _weighted(per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    w = _row_weights(weights, per_token.shape[0], per_token.device)
    return per_token if w is None else per_token * w


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (x.detach().float() * m).sum() / m.sum().clamp(min=1)


def opd_reward(student_log_prob: torch.Tensor, teacher_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VLA-OPD's dense token reward r_t = -(log S(a_t) - log T(a_t)), detached; ``[B, T]`` float32, 0 off-mask."""
    m = check_policy_inputs(student_log_prob, student_log_prob, teacher_log_prob, mask)
    r = teacher_log_prob.detach().float() - student_log_prob.detach().float()
    return torch.where(m, r, torch.zeros((), device=r.device))


def opd_reinforce_loss(
    log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE form of VLA-OPD: per token -r_t * log S(a_t), r_t recomputed from ``log_prob`` (stop-grad).

    ``log_prob`` and ``teacher_log_prob`` are ``[B, T]`` log-probs of the sampled tokens under the
    current student and the frozen teacher. Metrics: ``opd/reward_mean`` (= -k1 estimate of KL(S || T)).
    """
    m = check_policy_inputs(log_prob, log_prob, teacher_log_prob, mask)
    reward = opd_reward(log_prob, teacher_log_prob, m)
    per_token = _weighted(-reward * log_prob.float(), weights)
    loss = aggregate(per_token, m, agg, counts=counts, norm_length=norm_length)
    return loss, {"opd/reward_mean": _masked_mean(reward, m)}


def opd_ppo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped form of VLA-OPD: advantage r_t = -(log S_old - log T) frozen at rollout, clipped ratio.

    Weights scale the advantage (the clipped surrogate is positively homogeneous in it, so this is the
    weighted loss). With one update per rollout the ratio is 1 and the gradient equals REINFORCE's.
    """
    m = check_policy_inputs(old_log_prob, log_prob, teacher_log_prob, mask)
    reward = opd_reward(old_log_prob, teacher_log_prob, m)
    advantages = _weighted(reward, weights)
    loss, metrics = ppo_clip_loss(
        old_log_prob,
        log_prob,
        advantages,
        m,
        clip_low=clip_low,
        clip_high=clip_high,
        agg=agg,
        counts=counts,
        norm_length=norm_length,
    )
    return loss, {**metrics, "opd/reward_mean": _masked_mean(reward, m)}


def divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
    chunk_size: int | None = None,
    checkpoint: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full-vocabulary divergence per position, ``[B, T, V]`` logits -> scalar.

    ``kind``: ``reverse_kl`` KL(S || T), ``forward_kl`` KL(T || S), or ``jsd``: GKD's JSD(beta) with
    M = beta T + (1 - beta) S (beta = 0 is exactly KL(T || S), beta = 1 exactly KL(S || T)).
    The teacher logits are detached. ``checkpoint=True`` recomputes each vocabulary chunk in backward
    instead of storing its float32 intermediates (peak memory about one chunk; one more forward).
    Metric ``distill/<kind>``: masked token mean.
    """
    if kind not in DIVERGENCES:
        raise ConfigError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    _check_logits(student_logits, teacher_logits, mask)
    teacher = teacher_logits.detach()
    if kind == "reverse_kl":
        per_token = divergences.reverse_kl(
            student_logits, teacher, chunk_size=chunk_size, checkpoint=checkpoint, mask=mask
        )
    elif kind == "forward_kl":
        per_token = divergences.forward_kl(
            student_logits, teacher, chunk_size=chunk_size, checkpoint=checkpoint, mask=mask
        )
    else:
        per_token = divergences.generalized_jsd(
            student_logits, teacher, beta, chunk_size=chunk_size, checkpoint=checkpoint, mask=mask
        )
    loss = aggregate(_weighted(per_token, weights), mask, agg, counts=counts, norm_length=norm_length)
    return loss, {f"distill/{kind}": _masked_mean(per_token, mask.bool())}


def hard_ce_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
    chunk_size: int | None = None,
    checkpoint: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hard cross-entropy on the teacher's argmax, -log S(argmax_a T(a)) per position.

    This is forward KL(one-hot(argmax T) || S): the teacher's soft information is dropped.
    """
    _check_logits(student_logits, teacher_logits, mask)
    target = teacher_logits.detach().argmax(-1)
    per_token = -token_logprobs(student_logits, target, chunk_size=chunk_size, checkpoint=checkpoint)
    per_token = torch.where(mask.bool(), per_token, torch.zeros((), device=per_token.device))
    loss = aggregate(_weighted(per_token, weights), mask, agg, counts=counts, norm_length=norm_length)
    return loss, {"distill/hard_ce": _masked_mean(per_token, mask.bool())}


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ShapeError(f"{name} must be a [B, T, V] tensor, got {getattr(t, 'shape', type(t).__name__)}")
    check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"mask must be a [B, T] bool or 0/1 tensor, got {type(mask).__name__}")
    if student_logits.shape != teacher_logits.shape:
        raise ShapeError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}; score the same positions with both models"
        )
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ShapeError(
            f"mask has shape {tuple(mask.shape)} but the logits' positions are {tuple(student_logits.shape[:2])}"
        )


# --- one signature on logits, for the registry and the trainer ----------------------------------------

Objective = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


#: Keywords the trainers pass to every objective (each objective forwards the ones it uses).
_CALL_KEYWORDS = ("old_log_prob", "weights", "agg", "counts", "norm_length", "chunk_size", "checkpoint")
_AGG = ("weights", "agg", "counts", "norm_length")


def _sampled(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and (detached) teacher log-probs ``[B, T]`` of the sampled tokens."""
    _check_logits(student_logits, teacher_logits, mask)
    safe = torch.where(mask.bool(), tokens, torch.zeros_like(tokens))
    return token_logprobs(student_logits, safe), token_logprobs(teacher_logits.detach(), safe)


def _opd_reinforce(student_logits, teacher_logits, tokens, mask, **kw):
    return opd_reinforce_loss(*_sampled(student_logits, teacher_logits, tokens, mask), mask, **kw)


def _opd_ppo(student_logits, teacher_logits, tokens, mask, *, old_log_prob=None, **kw):
    if old_log_prob is None:
        raise ConfigError("opd_ppo needs old_log_prob (the student's log-probs at rollout time)")
    return opd_ppo_loss(old_log_prob, *_sampled(student_logits, teacher_logits, tokens, mask), mask, **kw)


def _divergence(kind: str) -> Objective:
    def fn(student_logits, teacher_logits, tokens, mask, **kw):
        return divergence_loss(student_logits, teacher_logits, mask, kind=kind, **kw)

    return fn


def _hard_ce(student_logits, teacher_logits, tokens, mask, **kw):
    return hard_ce_loss(student_logits, teacher_logits, mask, **kw)


def _objective(name: str, fn: Objective, uses: tuple[str, ...]) -> Objective:
    """``fn`` with the one calling convention of :data:`OBJECTIVES`: it receives only the keywords in ``uses``.

    These objectives live in klcore's ``loss`` registry, whose documented convention is the RL policy loss
    ``fn(old_log_prob, log_prob, advantages, mask, ...)``; called that way (e.g. by ``GRPOTrainer`` with
    ``config.loss = name``) or with unknown options they raise ``ConfigError``.
    """
    accepted = frozenset(_CALL_KEYWORDS + OPTIONS)

    @functools.wraps(fn)
    def objective(student_logits, teacher_logits, tokens, mask, **options):
        if not isinstance(student_logits, torch.Tensor) or student_logits.dim() != 3:
            raise ConfigError(
                f"{name!r} is an opd-distill distillation objective: it takes (student_logits [B, T, V], "
                f"teacher_logits [B, T, V], tokens [B, T], mask [B, T]) from DistillTrainer / EnvDistillTrainer, "
                f"but its first argument is {getattr(student_logits, 'shape', type(student_logits).__name__)}. "
                "It is not an RL policy loss fn(old_log_prob, log_prob, advantages, mask): do not set it as "
                f"GRPOTrainer's config.loss; use DistillConfig(loss={name!r}) (or EnvDistillConfig) instead"
            )
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(
                f"{name!r} got unknown options {unknown}; it takes {sorted(accepted)} "
                f"(loss_options may hold {list(OPTIONS)})"
            )
        return fn(student_logits, teacher_logits, tokens, mask, **{k: v for k, v in options.items() if k in uses})

    return objective


_FULL = (*_AGG, "chunk_size", "checkpoint")

#: name -> ``fn(student_logits [B,T,V], teacher_logits [B,T,V], tokens [B,T], mask [B,T], *, old_log_prob,
#: weights, agg, counts, norm_length, chunk_size, checkpoint, beta, clip_low, clip_high) -> (loss, metrics)``; the options
#: an objective does not use (``beta`` is JSD's, ``clip_*`` PPO's) are ignored, so one ``loss_options`` table
#: serves both stages of a schedule. Called with the RL policy-loss convention (2-D log-probs first, as
#: ``GRPOTrainer`` does) or with unknown options, an objective raises ``ConfigError``.
OBJECTIVES: dict[str, Objective] = {
    "opd_reinforce": _objective("opd_reinforce", _opd_reinforce, _AGG),
    "opd_ppo": _objective("opd_ppo", _opd_ppo, ("old_log_prob", *_AGG, "clip_low", "clip_high")),
    "full_reverse_kl": _objective("full_reverse_kl", _divergence("reverse_kl"), (*_FULL, "beta")),
    "full_forward_kl": _objective("full_forward_kl", _divergence("forward_kl"), (*_FULL, "beta")),
    "full_jsd": _objective("full_jsd", _divergence("jsd"), (*_FULL, "beta")),
    "hard_ce": _objective("hard_ce", _hard_ce, _FULL),
}

__all__ = [
    "DIVERGENCES",
    "OBJECTIVES",
    "check_vocab",
    "divergence_loss",
    "hard_ce_loss",
    "opd_ppo_loss",
    "opd_reinforce_loss",
    "opd_reward",
]
