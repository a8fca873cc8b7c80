"""Applying an expert reduction to the model: pruning, router redirection (a module patch) and group merging.

Pruning slices the fused expert tensors and the router rows (and any router tensor indexed by expert, e.g. a
bias or ``e_score_correction_bias``) and updates the config, so the model saves with ``save_pretrained`` and
loads back with ``from_pretrained`` without custom code. Budgets must be uniform across layers (one config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hodgecover.moe import EXPERT_COUNT_KEYS, MoELayer, find_moe_layers, merge_operator
from klcore.errors import ConfigError, DataError


def _survivors(moe: MoELayer, keep: Sequence[int]) -> torch.Tensor:
    idx = sorted({int(k) for k in keep})
    if not idx or idx[0] < 0 or idx[-1] >= moe.num_experts:
        raise DataError(f"layer {moe.index}: keep {list(keep)!r} must be non-empty indices in 0..{moe.num_experts - 1}")
    if len(idx) < moe.top_k:
        raise ConfigError(f"layer {moe.index}: keeping {len(idx)} experts, fewer than top_k={moe.top_k}")
    return torch.tensor(idx, dtype=torch.long)


def _slice_experts(moe: MoELayer, idx: torch.Tensor) -> None:
    with torch.no_grad():
        for name, p in moe.expert_parameters().items():
            setattr(moe.experts, name, nn.Parameter(p.data[idx.to(p.device)].clone(), requires_grad=p.requires_grad))
    moe.experts.num_experts = len(idx)


def _slice_router(moe: MoELayer, idx: torch.Tensor, old: int) -> None:
    with torch.no_grad():
        for name, p in list(moe.router.named_parameters(recurse=False)):
            if p.shape[0] == old:
                setattr(moe.router, name, nn.Parameter(p.data[idx.to(p.device)].clone(), requires_grad=p.requires_grad))
        for name, b in list(moe.router.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] == old:
                moe.router.register_buffer(name, b[idx.to(b.device)].clone())
    for attr in ("num_experts", "out_features"):
        if hasattr(moe.router, attr):
            setattr(moe.router, attr, len(idx))


def _set_expert_count(model: Any, count: int) -> None:
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        configs.append(text)
    for cfg in configs:
        for key in EXPERT_COUNT_KEYS:
            if getattr(cfg, key, None) is not None:
                setattr(cfg, key, count)


def _uniform(keep: Mapping[int, Sequence[int]], layers: list[MoELayer]) -> int:
    missing = sorted(m.index for m in layers if m.index not in keep)
    if missing:
        raise DataError(f"keep lacks MoE layers {missing}; give the survivors of every MoE layer")
    sizes = {len(set(keep[m.index])) for m in layers}
    if len(sizes) != 1:
        raise ConfigError(f"survivor counts differ across layers ({sorted(sizes)}); a stock config holds one expert count")
    return sizes.pop()


def prune_experts(model: nn.Module, keep: Mapping[int, Sequence[int]]) -> nn.Module:
    """Keep only experts ``keep[layer]`` (decoder layer index -> survivor indices) in place; returns ``model``.

    Router rows of dropped experts are deleted: each token re-picks its top-k among the survivors (REAP-style).
    """
    layers = find_moe_layers(model)
    count = _uniform(keep, layers)
    for moe in layers:
        old = moe.num_experts
        idx = _survivors(moe, keep[moe.index])
        _slice_experts(moe, idx)
        _slice_router(moe, idx, old)
    _set_expert_count(model, count)
    return model


class RedirectRouter(nn.Module):
    """Wraps a router: top-k over all ``E`` original logits, then expert ids remapped by ``redirect [E] -> [0, k)``.

    Two routed slots that land on one survivor both run it and their weighted outputs add up (the stock fused
    expert forward sums per slot with ``index_add_``).
    """

    def __init__(self, router: nn.Module, redirect: torch.Tensor) -> None:
        super().__init__()
        self.router: Any = router
        self.register_buffer("redirect", redirect.clone().long())
        self.top_k = router.top_k

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The wrapped router's ``(logits [N, E], top-k weights [N, k], ids [N, k])`` with ids remapped."""
        logits, scores, indices = self.router(hidden_states)
        redirect: torch.Tensor = self.redirect  # type: ignore[assignment]
        return logits, scores, redirect.to(indices.device)[indices]


def apply_redirect(model: nn.Module, keep: Mapping[int, Sequence[int]], redirect: Mapping[int, torch.Tensor]) -> nn.Module:
    """Drop experts but keep every router row, sending dropped experts' tokens to survivors (in place).

    ``redirect[layer]`` is an int64 ``[E]`` map into survivor positions (``selection.redirect_map``). The result is a
    module patch (``RedirectRouter`` replaces ``block.gate``): it runs in memory but is not a stock checkpoint.
    """
    layers = find_moe_layers(model)
    count = _uniform(keep, layers)
    for moe in layers:
        idx = _survivors(moe, keep[moe.index])
        r = torch.as_tensor(redirect[moe.index], dtype=torch.long)
        if r.shape != (moe.num_experts,) or int(r.min()) < 0 or int(r.max()) >= len(idx):
            raise DataError(f"layer {moe.index}: redirect must map {moe.num_experts} experts into 0..{len(idx) - 1}")
        if not torch.equal(r[idx], torch.arange(len(idx))):
            raise DataError(f"layer {moe.index}: redirect must send each survivor to its own position")
        _slice_experts(moe, idx)
        moe.block.gate = RedirectRouter(moe.router, r.to(moe.router.weight.device))
    _set_expert_count(model, count)
    return model


def merge_groups(
    model: nn.Module, groups: Mapping[int, Sequence[Sequence[int]]], frequencies: Mapping[int, torch.Tensor]
) -> nn.Module:
    """Merge each group of experts into one (frequency-weighted, ``merge_operator``) and prune the rest (in place).

    The merged weights go to the group's most frequent member, whose router row is kept; the other members'
    rows are deleted (HC-SMoE-style merging with REAP-style row deletion).
    """
    layers = find_moe_layers(model)
    keep = {}
    for moe in layers:
        freq = torch.as_tensor(frequencies[moe.index], dtype=torch.float32)
        members = sorted(int(v) for g in groups[moe.index] for v in g)
        if members != list(range(moe.num_experts)):
            raise DataError(f"layer {moe.index}: groups must partition the experts 0..{moe.num_experts - 1}")
        reps = []
        with torch.no_grad():
            for g in groups[moe.index]:
                rep = max(g, key=lambda i: (float(freq[i]), -i))
                for p in moe.expert_parameters().values():
                    p.data[rep] = merge_operator(p.data, list(g), freq)
                reps.append(rep)
        keep[moe.index] = sorted(reps)
    return prune_experts(model, keep)


__all__ = ["RedirectRouter", "apply_redirect", "merge_groups", "prune_experts"]
