"""LoRA-MoE over style experts with peft: hard per-sample routing and a learned soft router.

Each style is one peft LoRA adapter (``add_style_experts``; rank 4 on ``to_q, to_k, to_v, to_out.0``
by default, as the reference). :class:`LoraMoE` takes over the adapters' contribution in every LoRA
layer: ``y = W x + sum_e g_e(x) * B_e A_e x * scaling_e`` with

* hard routing (``route(expert_index)``): ``g`` one-hot per sample, so each sample of a batch uses
  its own expert, in training too (peft's ``adapter_names`` is inference-only);
* a soft router (``LoraMoE(..., router=True)`` then ``route_soft()``): per layer a gate
  ``softmax(W_g LayerNorm(concat_e delta_e(x)) / temperature)`` per token over the experts' outputs
  (MoLE), trained with the experts frozen; ``balance_loss()`` is ``-mean_e log q_e - log E`` with
  ``q`` the gate averaged over layers, tokens and samples (0 iff ``q`` is uniform).

Experts save and load in the diffusers LoRA format (``save_expert`` / ``load_expert``; a pipeline's
``load_lora_weights(path, adapter_name=style)`` reads the same file).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from klcore.errors import CheckpointError, ConfigError, ShapeError, UnsupportedModelError

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: peft's ``init_lora_weights`` values accepted here (``False``: random B, for tests)
LoraInit = bool | Literal["gaussian", "eva", "olora", "pissa", "loftq"]
_PREFIX = {"FluxTransformer2DModel": "transformer", "UNet2DConditionModel": "unet"}


def style_lora_config(
    rank: int = 4, alpha: int | None = None, target_modules: Sequence[str] = DEFAULT_TARGETS,
    init: LoraInit = "gaussian",
) -> LoraConfig:
    """The reference's ``LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=...)``."""
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    return LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=init, target_modules=list(target_modules)
    )


def add_style_experts(model: nn.Module, styles: Sequence[str], config: LoraConfig | None = None) -> None:
    """Add one LoRA adapter per style (diffusers ``add_adapter``); base frozen, every expert trainable."""
    if not styles or len(set(styles)) != len(styles):
        raise ConfigError(f"styles must be distinct, non-empty names, got {list(styles)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for style in styles:
        model.add_adapter(config if config is not None else style_lora_config(), adapter_name=style)  # type: ignore[operator]
    for style in styles:  # peft leaves only the last-added adapter trainable; every expert trains (per-sample routing)
        for param in expert_parameters(model, style):
            param.requires_grad_(True)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every peft LoRA layer of ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def expert_parameters(model: nn.Module, style: str) -> list[nn.Parameter]:
    """The LoRA A/B weights of one expert."""
    params = [p for n, p in model.named_parameters() if f".{style}." in n and "lora_" in n]
    if not params:
        raise ConfigError(f"model has no LoRA expert named {style!r}")
    return params


class _Gate(nn.Module):
    def __init__(self, experts: int, features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(experts * features)
        self.proj = nn.Linear(experts * features, experts)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, deltas: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(self.proj(self.norm(deltas.flatten(-2))) / temperature, dim=-1)


class LoraMoE(nn.Module):
    """Per-sample mixture of the LoRA ``experts`` already added to ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, experts: Sequence[str], *, router: bool = False, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.experts, self.temperature = list(experts), temperature
        self.layers = lora_layers(model)
        if not self.layers:
            raise UnsupportedModelError("model has no LoRA layers: call add_style_experts first")
        missing = [e for e in self.experts if e not in self.layers[0][1].lora_A]
        if missing:
            raise ConfigError(f"experts {missing} are not adapters of the model; it has {list(self.layers[0][1].lora_A)}")
        self.gates = nn.ModuleDict()
        if router:
            for i, (name, layer) in enumerate(self.layers):
                if layer.out_features is None:
                    raise UnsupportedModelError(f"LoRA layer {name} has no out_features; the router needs Linear")
                self.gates[str(i)] = _Gate(len(self.experts), layer.out_features)
        self._scaling = [_adapter_scaling(name, layer, self.experts) for name, layer in self.layers]
        self._mode: str | None = None
        self._index: torch.Tensor | None = None
        self.last_gates: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._disabled_before: list[bool] | None = None

    def route(self, expert_index: torch.Tensor) -> None:
        """Hard routing: sample ``b`` uses expert ``experts[expert_index[b]]`` (``[B]`` long)."""
        if expert_index.dim() != 1:
            raise ShapeError(f"expert_index must be [B], got shape {tuple(expert_index.shape)}")
        if ((expert_index < 0) | (expert_index >= len(self.experts))).any():
            raise ConfigError(f"expert_index must lie in [0, {len(self.experts)}), got {expert_index.tolist()}")
        self._mode, self._index = "hard", expert_index.long()
        self._take_over(True)

    def route_soft(self) -> None:
        """Soft routing through the learned gates (needs ``router=True``)."""
        if not len(self.gates):
            raise ConfigError("this LoraMoE has no router: build it with router=True")
        self._mode, self._index = "soft", None
        self._take_over(True)

    def release(self) -> None:
        """Hand the LoRA layers back to peft as they were before routing (its ``set_adapters`` state and
        ``enable_lora`` / ``disable_lora`` flag apply again) and remove this object's hooks."""
        self._mode, self._index = None, None
        self._take_over(False)

    def remove(self) -> None:
        """Same as :meth:`release` (kept for callers that detach explicitly)."""
        self.release()

    @property
    def active(self) -> bool:
        """Whether this object currently routes the LoRA layers (hooks installed)."""
        return bool(self._handles)

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def balance_loss(self) -> torch.Tensor:
        """``-mean_e log q_e - log E`` of the last soft forward's gates (``>= 0``, 0 iff balanced)."""
        if not self.last_gates:
            raise ShapeError("no gates recorded: run a forward pass after route_soft()")
        q = torch.stack([g.reshape(-1, g.shape[-1]).mean(0) for g in self.last_gates]).mean(0)
        return -torch.log(q.clamp_min(1e-12)).mean() - math.log(len(self.experts))

    def _take_over(self, on: bool) -> None:
        if on:
            self.last_gates = []
            if self._handles:
                return
            self._disabled_before = [bool(layer._disable_adapters) for _, layer in self.layers]
            for _, layer in self.layers:
                layer._disable_adapters = True  # peft then returns the base layer's output; the hook adds the experts
            # peft's LoRA layers are modules (LoraLayer is a mixin of e.g. lora.Linear(nn.Module, LoraLayer))
            self._handles = [
                cast(nn.Module, layer).register_forward_hook(self._hook(i)) for i, (_, layer) in enumerate(self.layers)
            ]
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._disabled_before is not None:
            for (_, layer), before in zip(self.layers, self._disabled_before, strict=True):
                layer._disable_adapters = before
            self._disabled_before = None

    def _hook(self, i: int) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            if self._mode is None:
                return out
            x = args[0]
            if self._mode == "hard":
                return out + self._hard_delta(layer, x, self._scaling[i])
            deltas = torch.stack([self._delta(layer, e, x, self._scaling[i][e]) for e in self.experts], dim=-2)
            gate = self.gates[str(i)](deltas, self.temperature)
            self.last_gates.append(gate)
            return out + (gate[..., None] * deltas).sum(-2).to(out.dtype)

        return hook

    @staticmethod
    def _delta(layer: Any, expert: str, x: torch.Tensor, scaling: float) -> torch.Tensor:
        a, b = layer.lora_A[expert], layer.lora_B[expert]
        return b(a(layer.lora_dropout[expert](x.to(a.weight.dtype)))) * scaling

    def _hard_delta(self, layer: Any, x: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
        index = self._index
        if index is None or index.shape[0] != x.shape[0]:
            raise ShapeError(f"routing has {0 if index is None else index.shape[0]} samples, the batch {x.shape[0]}")
        index = index.to(x.device)
        result = torch.zeros(*x.shape[:-1], layer.base_layer.out_features, dtype=x.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            rows = (index == e).nonzero().flatten()
            if rows.numel():
                result = result.index_add(0, rows, self._delta(layer, expert, x[rows], scaling[expert]).to(x.dtype))
        return result


def _adapter_scaling(name: str, layer: Any, experts: Sequence[str]) -> dict[str, float]:
    """Each expert's scaling from its config, ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    peft's ``layer.scaling`` is not read: diffusers' ``set_adapters(names, weights)`` rewrites it in place
    (and leaves it stale for adapters it does not name)."""
    out = {}
    for e in experts:
        if layer.use_dora.get(e, False):
            raise UnsupportedModelError(f"expert {e!r} is a DoRA adapter (layer {name}); LoraMoE routes plain LoRA only")
        r, alpha = layer.r[e], layer.lora_alpha[e]
        out[e] = alpha / math.sqrt(r) if layer.use_rslora.get(e, False) else alpha / r
    return out


WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def save_expert(model: nn.Module, style: str, directory: str | Path) -> Path:
    """Write expert ``style`` as ``DIR/pytorch_lora_weights.safetensors`` in the diffusers LoRA format.

    The file is written into a fresh hidden folder inside ``DIR`` and renamed over the old weights
    (atomic on one file system); nothing else in ``DIR`` is touched, and on failure the old weights stay."""
    import shutil
    import tempfile

    from diffusers import FluxPipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kind = type(model).__name__
    if kind not in _PREFIX:
        raise UnsupportedModelError(f"save_expert supports {sorted(_PREFIX)}, got {kind}")
    expert_parameters(model, style)
    directory = Path(directory)
    target = directory / WEIGHTS_NAME
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; save_expert needs a folder (it writes {WEIGHTS_NAME} inside)")
    if target.exists() and not target.is_file():
        raise CheckpointError(f"{target} exists and is not a file; move it away before saving the expert there")
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=style))
    configs: Any = model.peft_config  # set by peft's add_adapter / load_lora_adapter
    meta = configs[style].to_dict()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".regionroute-expert-", dir=directory))
    try:
        if kind == "FluxTransformer2DModel":
            FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)
        else:
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
        (tmp / WEIGHTS_NAME).replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the folder this call created, and only what it wrote there
    return target


def load_expert(model: nn.Module, directory: str | Path, style: str) -> None:
    """Load an expert written by :func:`save_expert` (or any diffusers LoRA file) as adapter ``style``."""
    kind = type(model).__name__
    if kind not in _PREFIX:
        raise UnsupportedModelError(f"load_expert supports {sorted(_PREFIX)}, got {kind}")
    path = Path(directory)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no LoRA file at {file}; pass the folder save_expert wrote")
    model.load_lora_adapter(str(file), adapter_name=style, prefix=_PREFIX[kind])  # type: ignore[operator]


__all__ = [
    "DEFAULT_TARGETS",
    "WEIGHTS_NAME",
    "LoraMoE",
    "add_style_experts",
    "expert_parameters",
    "load_expert",
    "lora_layers",
    "save_expert",
    "style_lora_config",
]
