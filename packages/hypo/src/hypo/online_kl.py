"""HyPO's online term: a leave-one-out (RLOO) score-function surrogate of the sequence reverse KL.

For each prompt, k >= 2 completions y_1..y_k are drawn from the current policy. With the detached
sequence log-ratio r_i = Σ_t [log π_θ - log π_ref](y_i,t) and the leave-one-out baseline
b_i = mean_{j≠i} r_j, the surrogate is ``coef * mean_prompts (1/k) Σ_i (r_i - b_i) log π_θ(y_i)``.
Its gradient is an unbiased estimate of ``coef * ∇ KL(π_θ(·|x) ‖ π_ref(·|x))`` averaged over prompts,
because ∇ E_π[log π/π_ref] = E_π[(log π/π_ref) ∇ log π] and b_i is independent of y_i.
"""

from __future__ import annotations

import torch

from klcore.errors import ConfigError, DTypeError, MaskError, NonFiniteError, ShapeError


def _check(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, mask: torch.Tensor, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(
            f"the leave-one-out KL surrogate needs group_size (k) >= 2 samples per prompt, got {group_size!r}"
        )
    for name, x in (("log_prob", log_prob), ("ref_log_prob", ref_log_prob), ("mask", mask)):
        if not isinstance(x, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if log_prob.dim() != 2:
        raise ShapeError(f"log_prob must be [N, R] per-token log-probs, got shape {tuple(log_prob.shape)}")
    for name, x in (("ref_log_prob", ref_log_prob), ("mask", mask)):
        if x.shape != log_prob.shape:
            raise ShapeError(f"{name} has shape {tuple(x.shape)} but log_prob has {tuple(log_prob.shape)}")
    if not log_prob.is_floating_point() or not ref_log_prob.is_floating_point():
        raise DTypeError(f"log-probs must be floating, got {log_prob.dtype} and {ref_log_prob.dtype}")
    rows = log_prob.shape[0]
    if rows == 0 or rows % group_size:
        raise ShapeError(
            f"log_prob has {rows} rows, not a positive multiple of group_size = {group_size}; "
            "rows must be grouped by prompt (prompt 0's k samples, then prompt 1's, ...)"
        )
    if not bool(mask.bool().any(-1).all()):
        raise MaskError("every sampled completion needs at least one valid token in mask (EOS counts)")


def sequence_log_ratio(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32 Σ_t mask (log_prob - ref_log_prob): the k1 estimate of the sequence reverse KL."""
    m = mask.to(torch.float32)
    return ((log_prob.float() - ref_log_prob.float()) * m).sum(-1)


def rloo_kl_surrogate(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int,
    coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The surrogate loss (scalar, float32) whose gradient estimates ``coef * ∇ KL(π_θ ‖ π_ref)``.

    ``log_prob``: ``[N, R]`` policy log-probs of the sampled tokens (with grad); ``ref_log_prob``:
    ``[N, R]`` frozen reference log-probs; ``mask``: ``[N, R]`` valid completion tokens. Rows are
    grouped by prompt, ``N = prompts * group_size``. The loss value is not the KL (it has mean zero);
    ``kl/online`` in the metrics is the k1 estimate mean_i r_i of the sequence KL.
    """
    _check(log_prob, ref_log_prob, mask, group_size)
    seq_logp = (log_prob.float() * mask.to(torch.float32)).sum(-1)
    with torch.no_grad():
        r = sequence_log_ratio(log_prob, ref_log_prob, mask)
        if not bool(torch.isfinite(r).all()):
            raise NonFiniteError("the sequence log-ratio log π_θ - log π_ref is not finite for some sample")
        grouped = r.view(-1, group_size)
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
        advantage = (grouped - baseline).reshape(-1)
    loss = coef * (advantage * seq_logp).mean()
    metrics = {"kl/online": float(r.mean()), "kl/online_std": float(r.std()) if r.numel() > 1 else 0.0}
    return loss, metrics


__all__ = ["rloo_kl_surrogate", "sequence_log_ratio"]
