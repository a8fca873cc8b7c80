"""Wanda unstructured pruning of the surviving experts (stage 2 of HodgeCover+Wanda).

Score ``S_ab = |W_ab| * ||X_b||_2`` with ``X`` the inputs of that weight over the calibration tokens (reused from
the barrier pass: per expert over its routed tokens, all tokens for a shared expert's linears); in every output
row the ``sparsity`` fraction of lowest-score weights is set to 0 (Sun et al. 2023, per-output comparison group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hodgecover.barriers import LayerStats
from hodgecover.moe import MoELayer, find_moe_layers
from klcore.errors import ConfigError, DataError


def second_ratio(target: float, first: float) -> float:
    """``r2`` with ``1 - (1 - r1)(1 - r2) = target``: the Wanda sparsity that completes expert reduction ``r1``."""
    if not 0.0 <= first < 1.0 or not 0.0 < target < 1.0:
        raise ConfigError(f"need 0 <= first < 1 and 0 < target < 1, got first={first}, target={target}")
    if target < first:
        raise ConfigError(f"target compression {target} is below the expert reduction {first}; raise the target")
    return 1.0 - (1.0 - target) / (1.0 - first)


def wanda_mask(weight: torch.Tensor, input_sq: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask ``[..., out, in]`` pruning the ``sparsity`` share of each output row by ``|W| ||X||``."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must lie in [0, 1), got {sparsity}")
    if input_sq.shape[-1] != weight.shape[-1]:
        raise DataError(f"input statistics have {input_sq.shape[-1]} features, the weight has {weight.shape[-1]} inputs")
    score = weight.detach().abs().float() * input_sq.float().sqrt().unsqueeze(-2)
    drop = int(sparsity * weight.shape[-1] + 1e-9)  # floor, as Wanda; the epsilon absorbs 0.4999... from r2
    mask = torch.ones_like(weight, dtype=torch.bool)
    if drop:
        idx = score.topk(drop, dim=-1, largest=False).indices
        mask.scatter_(-1, idx, False)
    return mask


def _pruned_weights(moe: MoELayer, s: LayerStats, keep: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, input_sq)`` of every tensor Wanda prunes in one block: the reduced experts' ``gate_up_proj`` and
    ``down_proj`` and the weight of each other linear with recorded inputs (a shared expert)."""
    idx = torch.as_tensor(sorted(keep), dtype=torch.long)
    if len(idx) != moe.num_experts:
        raise DataError(f"layer {moe.index}: keep has {len(idx)} experts, the model {moe.num_experts}")
    pairs = [(moe.experts.gate_up_proj, s.input_sq[idx]), (moe.experts.down_proj, s.hidden_sq[idx])]
    for name, sub in moe.block.named_modules():
        if name in s.linear_input_sq and isinstance(sub, nn.Linear):
            pairs.append((sub.weight, s.linear_input_sq[name]))
    return pairs


def _budget(model: nn.Module, stats: Mapping[int, LayerStats], keep: Mapping[int, Sequence[int]]) -> tuple[int, int]:
    """``(removed, counted)``: parameters removed by stage 1 (dropped or merged-away experts) and the parameters
    the compression target counts: every original routed expert plus each tensor Wanda prunes outside them."""
    removed = counted = 0
    for moe in find_moe_layers(model):
        original = len(stats[moe.index].frequencies)
        per_expert = moe.experts.gate_up_proj[0].numel() + moe.experts.down_proj[0].numel()
        pairs = _pruned_weights(moe, stats[moe.index], keep[moe.index])
        removed += (original - moe.num_experts) * per_expert
        counted += original * per_expert + sum(w.numel() for w, _ in pairs[2:])
    return removed, counted


def hybrid_sparsity(
    model: nn.Module, stats: Mapping[int, LayerStats], keep: Mapping[int, Sequence[int]], target: float
) -> float:
    """Wanda sparsity ``r2`` that brings an expert-reduced ``model`` to ``target`` compression.

    Counted parameters: the original routed experts' weights and the block's other pruned linears (the shared
    expert). Stage 1 removed ``1 - K/E`` of the experts after rounding (not the nominal ratio), so
    ``r2 = (target * counted - removed) / (counted - removed)``; with no shared expert and uniform budgets this is
    ``second_ratio(target, 1 - K/E)``.
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target compression must lie in (0, 1), got {target!r}")
    removed, counted = _budget(model, stats, keep)
    if removed > target * counted:
        raise ConfigError(f"stage 1 already removes {removed / counted:.4f} of the counted parameters, more than the "
                          f"target {target}; raise the target or lower the expert ratio")
    return (target * counted - removed) / (counted - removed)


@torch.no_grad()
def wanda_prune(
    model: nn.Module, stats: Mapping[int, LayerStats], keep: Mapping[int, Sequence[int]], sparsity: float
) -> dict[str, float]:
    """Prune the (already reduced) experts of every MoE layer and the block's other linears in place.

    ``stats`` are the stage-1 statistics indexed by original expert; ``keep[layer]`` the survivors' original
    indices, in the order of the reduced experts. Returns ``wanda/sparsity`` (zero share of the pruned tensors)
    and ``wanda/compression`` (removed or zero share of the counted parameters, as in ``hybrid_sparsity``).
    """
    zeros = total = 0
    for moe in find_moe_layers(model):
        for weight, sq in _pruned_weights(moe, stats[moe.index], keep[moe.index]):
            mask = wanda_mask(weight, sq.to(weight.device), sparsity)
            weight.mul_(mask.to(weight.dtype))
            zeros += int((~mask).sum())
            total += mask.numel()
    removed, counted = _budget(model, stats, keep)
    return {"wanda/sparsity": zeros / max(total, 1), "wanda/compression": (removed + zeros) / max(counted, 1)}


__all__ = ["hybrid_sparsity", "second_ratio", "wanda_mask", "wanda_prune"]
