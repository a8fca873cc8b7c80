"""Applying an expert reduction to the model: pruning, router redirection (a module patch) and group merging.

Pruning slices the fused expert tensors and every router tensor indexed by expert (rows of ``weight``, a bias,
``e_score_correction_bias``, nested ones such as Ernie-4.5's ``moe_statics.e_score_correction_bias [1, E]``) and
updates the config, so the model saves with ``save_pretrained`` and loads back with ``from_pretrained`` without
custom code. Group-limited routing (DeepSeek-V3 ``n_group``) is checked to still work. Budgets must be uniform
across layers (one config). Every layer is validated before any is changed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hodgecover.moe import EXPERT_COUNT_KEYS, MoELayer, find_moe_layers, merge_operator
from klcore.errors import ConfigError, DataError, UnsupportedModelError


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


def _router_tensors(moe: MoELayer, old: int) -> list[tuple[nn.Module, str, torch.Tensor, int]]:
    """Every parameter and buffer of the router (nested modules included) indexed by expert, with that dim.

    A 2-D ``weight`` is sliced on dim 0 (rows ``[E, H]``); any other tensor on its last dim when that is ``E``
    (``bias [E]``, ``e_score_correction_bias [E]``, Ernie-4.5's ``moe_statics.e_score_correction_bias [1, E]``).
    """
    found = []
    for path, module in moe.router.named_modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in tensors:
            if t is None or t.dim() == 0:
                continue
            if name == "weight" and t.dim() == 2 and t.shape[0] == old:
                found.append((module, name, t, 0))
            elif t.shape[-1] == old:
                found.append((module, name, t, t.dim() - 1))
            elif old in t.shape:
                where = f"{path}.{name}" if path else name
                raise UnsupportedModelError(
                    f"layer {moe.index}: router tensor {where} {tuple(t.shape)} has an expert axis hodgecover does not "
                    f"know how to slice (expected [E, H] weights or [..., E] biases with E={old})"
                )
    return found


def _slice_router(moe: MoELayer, idx: torch.Tensor, old: int) -> None:
    with torch.no_grad():
        for module, name, t, dim in _router_tensors(moe, old):
            sliced = t.data.index_select(dim, idx.to(t.device)).clone()
            if isinstance(t, nn.Parameter):
                setattr(module, name, nn.Parameter(sliced, requires_grad=t.requires_grad))
            else:
                module.register_buffer(name, sliced, persistent=name not in module._non_persistent_buffers_set)
    for owner in (moe.router, moe.block):
        for attr in ("num_experts", "out_features"):
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, len(idx))


def _check_groups(moe: MoELayer, idx: torch.Tensor, old: int) -> None:
    """Group-limited routing (DeepSeek-V3 ``n_group``/``topk_group``) must still work on ``len(idx)`` experts.

    Raises ``ConfigError`` when it cannot; warns when the survivors are spread unevenly over the original groups
    (the pruned model then groups experts that were in different groups).
    """
    groups = getattr(moe.router, "num_group", None) or getattr(moe.router, "n_group", None)
    if not isinstance(groups, int) or groups <= 1:
        return
    k, top_groups = len(idx), int(getattr(moe.router, "topk_group", groups) or groups)
    fix = ("pick a ratio whose survivor count is a multiple of n_group, or use dropped='redirect', which keeps "
           "every router row and the original groups")
    if k % groups:
        raise ConfigError(f"layer {moe.index}: {k} surviving experts cannot form n_group={groups} equal groups; {fix}")
    size = k // groups
    if size < 2:
        raise ConfigError(f"layer {moe.index}: {size} expert per group after pruning; group-limited routing scores a "
                          f"group by its top 2 experts, so keep >= {2 * groups}; {fix}")
    if top_groups * size < moe.top_k:
        raise ConfigError(f"layer {moe.index}: topk_group={top_groups} groups of {size} experts hold fewer than "
                          f"top_k={moe.top_k}; keep >= {groups * -(-moe.top_k // top_groups)} experts; {fix}")
    per_group = torch.bincount(idx // (old // groups), minlength=groups)
    if not bool((per_group == size).all()):
        warnings.warn(
            f"layer {moe.index}: survivors per original group {per_group.tolist()} are uneven, so the pruned model's "
            f"{groups} groups of {size} mix experts of different original groups (group-limited routing changes); "
            "use dropped='redirect' to keep the original groups", UserWarning, stacklevel=3,
        )


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
    Every layer is checked before any is changed, so a refused prune leaves the model as it was.
    """
    layers = find_moe_layers(model)
    count = _uniform(keep, layers)
    for moe, idx, old in _prune_plans(layers, keep):
        _slice_experts(moe, idx)
        _slice_router(moe, idx, old)
    _set_expert_count(model, count)
    return model


def _prune_plans(layers: list[MoELayer], keep: Mapping[int, Sequence[int]]) -> list[tuple[MoELayer, torch.Tensor, int]]:
    """``(layer, survivor indices, old expert count)`` per layer after every check; changes nothing."""
    plans = []
    for moe in layers:
        if isinstance(moe.router, RedirectRouter):
            raise ConfigError(f"layer {moe.index} is already redirected; prune the original model instead")
        old, idx = moe.num_experts, _survivors(moe, keep[moe.index])
        _router_tensors(moe, old)  # raises on a router layout that cannot be sliced
        _check_groups(moe, idx, old)
        plans.append((moe, idx, old))
    return plans


class RedirectRouter(nn.Module):
    """Wraps a router: top-k over all ``E`` original logits, then expert ids remapped by ``redirect [E] -> [0, k)``.

    Two routed slots that land on one survivor both run it and their weighted outputs add up (the stock fused
    expert forward sums per slot with ``index_add_``). ``keep [k]`` holds the survivors' original indices.
    Neither is saved with the weights; see ``apply_redirect`` for what ``state_dict`` holds.
    """

    def __init__(self, router: nn.Module, redirect: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.router: Any = router
        self.register_buffer("redirect", redirect.clone().long(), persistent=False)
        self.register_buffer("keep", keep.clone().long(), persistent=False)
        self.top_k = router.top_k

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The wrapped router's ``(logits [N, E], top-k weights [N, k], ids [N, k])`` with ids remapped."""
        logits, scores, indices = self.router(hidden_states)
        redirect: torch.Tensor = self.redirect  # type: ignore[assignment]
        return logits, scores, redirect.to(indices.device)[indices]


def _stock_state_dict(block: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook of a redirected block: the stock ``E``-slot layout (slot ``i`` holds the weights of
    survivor ``redirect[i]``; router tensors under ``gate.`` as in the unwrapped model)."""
    gate: Any = block.gate
    redirect: torch.Tensor = gate.redirect
    wrapped = prefix + "gate.router."
    for key in [k for k in state_dict if k.startswith(wrapped)]:
        state_dict[prefix + "gate." + key[len(wrapped):]] = state_dict.pop(key)
    experts: Any = block.experts
    for name, p in experts.named_parameters(recurse=False):
        key = prefix + "experts." + name
        if key in state_dict and p.dim() >= 1 and p.shape[0] == experts.num_experts:
            state_dict[key] = state_dict[key].detach().index_select(0, redirect.to(p.device))


def apply_redirect(model: nn.Module, keep: Mapping[int, Sequence[int]], redirect: Mapping[int, torch.Tensor]) -> nn.Module:
    """Drop experts but keep every router row, sending dropped experts' tokens to survivors (in place).

    ``redirect[layer]`` is an int64 ``[E]`` map into survivor positions (``selection.redirect_map``). In memory the
    block holds ``k`` experts and a ``RedirectRouter``; the config keeps ``E`` (the routing slots). ``state_dict``
    (hence ``save_pretrained``) gives a stock ``E``-slot checkpoint in which every slot holds its survivor's weights
    (tied copies): ``from_pretrained`` reloads it without custom code to the same logits. ``save_redirected`` adds
    ``redirect.pt`` so that ``load_redirected`` restores the compact ``k``-expert form.
    """
    layers = find_moe_layers(model)
    _uniform(keep, layers)
    plans = []
    for moe in layers:
        if isinstance(moe.router, RedirectRouter):
            raise ConfigError(f"layer {moe.index} is already redirected; redirect the original model instead")
        idx = _survivors(moe, keep[moe.index])
        r = torch.as_tensor(redirect[moe.index], dtype=torch.long)
        if r.shape != (moe.num_experts,) or int(r.min()) < 0 or int(r.max()) >= len(idx):
            raise DataError(f"layer {moe.index}: redirect must map {moe.num_experts} experts into 0..{len(idx) - 1}")
        if not torch.equal(r[idx], torch.arange(len(idx))):
            raise DataError(f"layer {moe.index}: redirect must send each survivor to its own position")
        plans.append((moe, idx, r))
    for moe, idx, r in plans:
        _slice_experts(moe, idx)
        device = moe.router.weight.device
        moe.block.gate = RedirectRouter(moe.router, r.to(device), idx.to(device))
        moe.block.register_state_dict_post_hook(_stock_state_dict)
    return model


def redirect_of_groups(num_experts: int, groups: Sequence[Sequence[int]], representatives: Sequence[int]) -> torch.Tensor:
    """``redirect [E]``: every member of group ``g`` to the position of ``representatives[g]`` among the sorted
    representatives (the slot binding of HC-SMoE)."""
    position = {rep: r for r, rep in enumerate(sorted(representatives))}
    out = torch.full((num_experts,), -1, dtype=torch.long)
    for g, rep in zip(groups, representatives):
        out[torch.as_tensor(list(g), dtype=torch.long)] = position[rep]
    return out


def merge_groups(
    model: nn.Module,
    groups: Mapping[int, Sequence[Sequence[int]]],
    frequencies: Mapping[int, torch.Tensor],
    *,
    bind_slots: bool = True,
) -> nn.Module:
    """Merge each group of experts into one (frequency-weighted, ``merge_operator``) in place.

    The merged weights go to the group's most frequent member. ``bind_slots=True`` (HC-SMoE as its authors do):
    every member's router row is kept and bound to the merged expert (``apply_redirect``). ``False``: the other
    members' rows are deleted and tokens re-pick among the merged experts (``prune_experts``).
    """
    layers = find_moe_layers(model)
    missing = sorted(m.index for m in layers if m.index not in groups)
    if missing:
        raise DataError(f"groups lacks MoE layers {missing}; give the groups of every MoE layer")
    reps: dict[int, list[int]] = {}
    for moe in layers:
        members = sorted(int(v) for g in groups[moe.index] for v in g)
        if members != list(range(moe.num_experts)):
            raise DataError(f"layer {moe.index}: groups must partition the experts 0..{moe.num_experts - 1}")
        freq = torch.as_tensor(frequencies[moe.index], dtype=torch.float32)
        reps[moe.index] = [max(g, key=lambda i: (float(freq[i]), -i)) for g in groups[moe.index]]
    keep = {layer: sorted(r) for layer, r in reps.items()}
    _uniform(keep, layers)
    if bind_slots:
        for moe in layers:
            _survivors(moe, keep[moe.index])
    else:
        _prune_plans(layers, keep)
    for moe in layers:
        freq = torch.as_tensor(frequencies[moe.index], dtype=torch.float32)
        with torch.no_grad():
            for g, rep in zip(groups[moe.index], reps[moe.index]):
                for p in moe.expert_parameters().values():
                    p.data[rep] = merge_operator(p.data, list(g), freq)
    if not bind_slots:
        return prune_experts(model, keep)
    redirect = {m.index: redirect_of_groups(m.num_experts, groups[m.index], reps[m.index]) for m in layers}
    return apply_redirect(model, keep, redirect)


__all__ = ["RedirectRouter", "apply_redirect", "merge_groups", "prune_experts", "redirect_of_groups"]
