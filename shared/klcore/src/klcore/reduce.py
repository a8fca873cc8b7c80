"""Masked aggregation of per-token values into one loss, correct under data parallelism.

Modes (verl's names):

- ``token-mean``: sum of valid values / number of valid tokens.
- ``seq-mean-token-sum``: per-sequence sum, averaged over sequences.
- ``seq-mean-token-mean``: per-sequence mean, averaged over sequences.
- ``seq-mean-token-sum-norm``: sum of valid values / (sequences x L) with a constant length L
  (Dr. GRPO; ``norm_length`` defaults to the mask's last dimension: pass the maximum response
  length so the divisor stays fixed through training).

A sequence counts when it has at least one valid token. When the values of one optimiser step are
spread over ranks and micro-batches, the denominators must be the *global* ones, otherwise the
gradient depends on how the batch was split. Compute them once per optimiser step with
``global_counts(mask_of_the_whole_local_minibatch, accelerator=...)`` and pass ``counts=`` to every
micro-batch's ``aggregate``: each call then returns this micro-batch's share, scaled by the number
of processes so that DDP's gradient averaging over ranks and plain summation of micro-batch
gradients give exactly the gradient of the global aggregate. With ``accelerator=`` and no
``counts``, the counts are reduced over ranks from this call's mask (every rank must call it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from klcore import _checks
from klcore.errors import ConfigError, MaskError

if TYPE_CHECKING:
    from accelerate import Accelerator

Mode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GlobalCounts:
    """Denominators of one optimiser step over all ranks and micro-batches.

    ``tokens``: valid tokens; ``sequences``: sequences with at least one valid token;
    ``world_size``: number of data-parallel processes that average gradients.
    """

    tokens: float
    sequences: float
    world_size: int = 1


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown aggregation mode {mode!r}; choose one of {', '.join(MODES)}")


def global_counts(mask: torch.Tensor, *, accelerator: Accelerator | None = None) -> GlobalCounts:
    """Count valid tokens and non-empty sequences of a ``[B, T]`` mask, summed over all ranks."""
    m = _checks.tensor(mask, "mask")
    _checks.exact_dims(m, "mask", 2, "[B, T]")
    m = _checks.mask(m, "mask", m.shape, allow_empty=accelerator is not None)
    local = torch.stack([m.sum(), m.any(-1).sum()]).to(torch.float64)
    world = 1
    if accelerator is not None and accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="sum")
        world = accelerator.num_processes
    tokens, sequences = (float(v) for v in local.tolist())
    if tokens == 0:
        raise MaskError("the mask selects no token on any rank; there is nothing to aggregate")
    return GlobalCounts(tokens=tokens, sequences=sequences, world_size=world)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: Mode | str = "token-mean",
    *,
    accelerator: Accelerator | None = None,
    counts: GlobalCounts | None = None,
    norm_length: int | None = None,
) -> torch.Tensor:
    """Aggregate ``[B, T]`` values under a ``[B, T]`` mask into a float32 scalar.

    Without ``accelerator`` or ``counts`` this is the plain masked aggregate of this batch. See the
    module docstring for the distributed semantics of ``accelerator`` and ``counts``.
    """
    _check_mode(mode)
    v = _checks.floating(values, "values")
    _checks.exact_dims(v, "values", 2, "[B, T]")
    distributed = counts is not None or accelerator is not None
    m = _checks.mask(mask, "mask", v.shape, allow_empty=distributed)
    if norm_length is not None and (not isinstance(norm_length, int) or norm_length < 1):
        raise ConfigError(f"norm_length must be a positive int, got {norm_length!r}")
    if counts is None:
        counts = global_counts(m, accelerator=accelerator) if distributed else GlobalCounts(
            tokens=float(m.sum()), sequences=float(m.any(-1).sum())
        )
    v = torch.where(m, v.float(), torch.zeros((), dtype=torch.float32, device=v.device))
    _checks.finite(v.detach(), "values (at a masked-in position)")
    scale = float(counts.world_size)
    if mode == "token-mean":
        return v.sum() * (scale / counts.tokens)
    if counts.sequences == 0:
        raise MaskError("no sequence has a valid token; there is nothing to aggregate")
    if mode == "seq-mean-token-sum":
        return v.sum() * (scale / counts.sequences)
    if mode == "seq-mean-token-mean":
        per_seq = v.sum(-1) / m.sum(-1).clamp(min=1).to(torch.float32)
        return per_seq.sum() * (scale / counts.sequences)
    length = norm_length if norm_length is not None else v.shape[-1]
    return v.sum() * (scale / (counts.sequences * length))


__all__ = ["MODES", "GlobalCounts", "aggregate", "global_counts"]
