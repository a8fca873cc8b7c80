"""Finding the sparse MoE blocks of a Hugging Face model (transformers 5 fused-expert layout) and merging experts.

A block is recognised by structure, not by class name: a child module of a decoder layer with a router
``.gate`` holding ``weight [E, H]`` and ``top_k``, and fused experts ``.experts`` holding
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. This covers Mixtral, Qwen2-MoE (its shared expert
is left alone), Qwen3-MoE and OLMoE as built by transformers 5, and any model that follows the same layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from klcore.errors import DataError, UnsupportedModelError

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass
class MoELayer:
    """One sparse MoE block: ``index`` is its decoder layer's position in ``decoder.layers``."""

    index: int
    layer: Any  # nn.Module; typed Any because their attributes (weight, gate_up_proj, ...) are dynamic
    block: Any
    router: Any
    experts: Any

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """The fused expert tensors indexed by expert on dim 0 (``gate_up_proj``, ``down_proj``, biases if any)."""
        e = self.num_experts
        return {n: p for n, p in self.experts.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == e}


def decoder_of(model: nn.Module) -> Any:
    """The decoder stack (the module holding ``layers`` and the final ``norm``) of a causal LM."""
    candidates = [model, getattr(model, "model", None)]
    inner = getattr(model, "model", None)
    if inner is not None:
        candidates.append(getattr(inner, "language_model", None))
    for c in candidates:
        if c is not None and isinstance(getattr(c, "layers", None), nn.ModuleList) and hasattr(c, "norm"):
            return c
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder stack with `.layers` (ModuleList) and `.norm` under `.model`; "
        "pass a Hugging Face causal LM such as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE"
    )


def _as_moe_block(module: nn.Module) -> tuple[Any, Any] | None:
    router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if router is None or experts is None:
        return None
    if isinstance(experts, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(module).__name__} keeps its experts in a ModuleList (transformers 4 layout); hodgecover needs the "
            "transformers 5 fused layout (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]): "
            "load the model with transformers >= 5"
        )
    gate_up, down, weight = (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None),
                             getattr(router, "weight", None))
    if not all(isinstance(t, torch.Tensor) for t in (gate_up, down, weight)) or not hasattr(router, "top_k"):
        return None
    e, two_i, h = gate_up.shape  # type: ignore[union-attr]
    redirect = getattr(router, "redirect", None)  # a RedirectRouter keeps all original rows
    rows = redirect.shape[0] if isinstance(redirect, torch.Tensor) else e
    if (weight.shape != (rows, h) or down.shape != (e, h, two_i // 2)  # type: ignore[union-attr]
            or getattr(experts, "has_bias", False)):
        raise UnsupportedModelError(
            f"{type(module).__name__} has fused experts of an unexpected layout: gate_up_proj {tuple(gate_up.shape)}, "  # type: ignore[union-attr]
            f"down_proj {tuple(down.shape)}, router {tuple(weight.shape)}; expected [E, 2I, H], [E, H, I], [E, H] "  # type: ignore[union-attr]
            "without expert biases"
        )
    return router, experts


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of ``model`` in layer order; raises ``UnsupportedModelError`` when there is none."""
    layers = decoder_of(model).layers
    found = []
    for idx, layer in enumerate(layers):
        for child in layer.children():
            parts = _as_moe_block(child)
            if parts is not None:
                found.append(MoELayer(idx, layer, child, *parts))
                break
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no sparse MoE block (a child with .gate router [E, H] and fused .experts); "
            "supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE families in the transformers 5 layout"
        )
    return found


def merge_operator(
    tensors: torch.Tensor, members: Sequence[int], frequencies: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """Frequency-weighted merge ``sum_a f_a W_a / sum_a f_a`` over ``members`` of ``tensors [E, ...]``.

    Falls back to the plain mean when the members' frequencies sum to 0. Computed in float32, returned in the
    tensors' dtype, shape ``[...]``.
    """
    idx = torch.as_tensor(list(members), dtype=torch.long, device=tensors.device)
    if idx.numel() == 0:
        raise DataError("merge_operator needs at least one member expert")
    f = torch.as_tensor(frequencies, dtype=torch.float32, device=tensors.device)[idx]
    if not torch.isfinite(f).all() or (f < 0).any():
        raise DataError(f"routing frequencies must be finite and >= 0, got {f.tolist()}")
    w = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / idx.numel())
    merged = torch.einsum("a,a...->...", w, tensors[idx].float())
    return merged.to(tensors.dtype)


@contextmanager
def merged(moe: MoELayer, members: Sequence[int], frequencies: torch.Tensor | Sequence[float]) -> Iterator[None]:
    """Temporarily overwrite every slot in ``members`` with their merged weights; restored bit-exactly on exit."""
    params = moe.expert_parameters()
    idx = torch.as_tensor(list(members), dtype=torch.long)
    saved = {n: p.data[idx].clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for p in params.values():
                p.data[idx] = merge_operator(p.data, members, frequencies).unsqueeze(0)
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.data[idx] = saved[n]


__all__ = ["EXPERT_COUNT_KEYS", "MoELayer", "decoder_of", "find_moe_layers", "merge_operator", "merged"]
