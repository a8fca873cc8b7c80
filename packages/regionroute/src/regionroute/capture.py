"""Attention capture for diffusers' Flux / Flux Kontext transformer and UNet2DConditionModel cross-attention.

The processors return exactly what the default processors return and, when an
:class:`AttentionStore` holds token selections, also record per sample the attention of the image
queries to that sample's selected text tokens, averaged over heads: a ``[B, N, S]`` map per layer
(N image queries, S selected tokens per sample, padded columns zero).

* ``mode="partial"`` (the reference): softmax over the sample's selected tokens only.
* ``mode="full"``: the true attention probability over all keys, ``exp(s_it - logsumexp_k s_ik)``,
  with the per-query logsumexp computed in query chunks (the full attention matrix is never held).

Flux joint sequences are ``[text | image]``; the queries kept are the first ``target_tokens`` image
tokens (the noisy target in Kontext's ``[text | target | context]``; all image tokens when None).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from klcore.errors import ConfigError, DTypeError, ShapeError, UnsupportedModelError
from regionroute._lse import attention_with_logsumexp, chunked_logsumexp, fused_attention_available

MODES = ("partial", "full")


class AttentionStore:
    """Token selections of the current batch and the maps recorded by the capture processors.

    ``set_tokens(indices [B, S], valid [B, S])`` arms recording (positions index the text/encoder
    sequence); ``clear_tokens()`` disarms it. ``maps[name]`` is ``[B, N, S]`` float32, ``grad`` kept
    unless ``detach``. ``union_batch_tokens=True`` reproduces the reference defect of normalising
    the partial softmax over the union of the batch's selected tokens.
    """

    def __init__(
        self,
        mode: str = "partial",
        *,
        chunk_size: int = 256,
        target_tokens: int | None = None,
        union_batch_tokens: bool = False,
        detach: bool = False,
        fused: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if target_tokens is not None and target_tokens < 1:
            raise ConfigError(f"target_tokens must be None (all image tokens) or >= 1, got {target_tokens}")
        self.mode, self.chunk_size, self.target_tokens = mode, chunk_size, target_tokens
        self.union_batch_tokens, self.detach, self.fused = union_batch_tokens, detach, fused
        self.indices: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.text_len: int | None = None
        self.maps: dict[str, torch.Tensor] = {}

    @property
    def armed(self) -> bool:
        return self.indices is not None

    def set_tokens(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Select tokens per sample: ``indices [B, S]`` (long), ``valid [B, S]`` (bool; padding False)."""
        if indices.dim() != 2:
            raise ShapeError(f"indices must be [B, S], got shape {tuple(indices.shape)}; pad ragged rows and pass valid")
        if indices.dtype not in (torch.int64, torch.int32):
            raise DTypeError(f"indices must be an integer tensor, got {indices.dtype}")
        valid = torch.ones_like(indices, dtype=torch.bool) if valid is None else valid.bool()
        if valid.shape != indices.shape:
            raise ShapeError(f"valid {tuple(valid.shape)} must match indices {tuple(indices.shape)}")
        if (indices[valid] < 0).any():
            raise ShapeError("token indices must be >= 0")
        self.indices, self.valid = indices.long(), valid
        self.maps = {}

    def clear_tokens(self) -> None:
        self.indices = self.valid = None
        self.maps = {}

    def stacked(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """Recorded maps of ``names`` (default: all, in recording order) as ``[L, B, N, S]``."""
        keys = list(self.maps) if names is None else list(names)
        if not keys:
            raise ShapeError("no attention maps recorded: call set_tokens before the forward pass")
        shapes = {tuple(self.maps[k].shape) for k in keys}
        if len(shapes) != 1:
            raise ShapeError(f"maps have different shapes {sorted(shapes)}; stack one resolution at a time")
        return torch.stack([self.maps[k] for k in keys])

    def record(
        self, name: str, query: torch.Tensor, key: torch.Tensor, scale: float, text_len: int,
        lse: torch.Tensor | None = None,
    ) -> None:
        """Record ``[B, N, S]`` from ``query [B, N, H, D]`` (image queries) and ``key [B, Lk, H, D]``;
        full mode takes the queries' logsumexp ``lse [B, H, N]`` when the caller has it (from the fused
        attention kernel), else computes it in query chunks."""
        if self.indices is None or self.valid is None:
            raise ShapeError(f"layer {name}: no tokens selected; call set_tokens before the forward pass")
        indices, valid = self.indices.to(key.device), self.valid.to(key.device)
        if indices.shape[0] != query.shape[0]:
            raise ShapeError(f"token selection has {indices.shape[0]} rows but the batch has {query.shape[0]}")
        if (indices[valid] >= text_len).any():
            raise ShapeError(f"a selected token index is >= the text length {text_len}; indices count text tokens")
        q = query.transpose(1, 2)  # [B, H, N, D]
        if self.union_batch_tokens:
            union = torch.unique(indices[valid])
            cols = union.expand(indices.shape[0], -1)
            col_valid = torch.ones_like(cols, dtype=torch.bool)
        else:
            cols, col_valid = indices, valid
        k_sel = torch.gather(key, 1, cols.clamp_min(0)[:, :, None, None].expand(-1, -1, *key.shape[2:]))
        scores = torch.matmul(q.float(), k_sel.transpose(1, 2).float().transpose(-1, -2)) * scale  # [B, H, N, C]
        if self.mode == "partial":
            probs = scores.masked_fill(~col_valid[:, None, None, :], float("-inf")).softmax(-1)
            probs = probs.nan_to_num(0.0)  # a sample without selected tokens
        else:
            if lse is None:
                lse = chunked_logsumexp(q, key.transpose(1, 2), scale, self.chunk_size)
            probs = torch.exp(scores - lse.float()[..., None])
        amap = probs.mean(1)
        if self.union_batch_tokens:
            pos = torch.searchsorted(union, indices.clamp_min(0))
            amap = torch.gather(amap, 2, pos[:, None, :].expand(-1, amap.shape[1], -1))
        amap = amap * valid[:, None, :]
        self.maps[name] = amap.detach() if self.detach else amap


class FluxAttentionCapture:
    """Drop-in for diffusers' ``FluxAttnProcessor`` (dual- and single-stream blocks) that also records."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store, self.name = store, name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([enc_q, query], 1), torch.cat([enc_k, key], 1), torch.cat([enc_v, value], 1)
        if image_rotary_emb is not None:
            # diffusers annotates freqs_cis as tuple[Tensor] although it takes the (cos, sin) pair
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type]
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type]

        store = self.store
        fused = (
            store.armed and store.mode == "full" and store.fused and fused_attention_available(query, attention_mask)
            and self._attention_backend is None and self._parallel_config is None
        )
        if fused:  # one kernel gives the output and the logsumexp the full-mode maps need
            scale = 1.0 / math.sqrt(query.shape[-1])
            out, lse = attention_with_logsumexp(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale)
            self._record(query, key, encoder_hidden_states, attention_mask, lse)
            out = out.transpose(1, 2)
        else:
            if store.armed:
                self._record(query, key, encoder_hidden_states, attention_mask)
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        enc_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc_out.contiguous())

    def _record(
        self, query: torch.Tensor, key: torch.Tensor, encoder_hidden_states: torch.Tensor | None, mask: torch.Tensor | None,
        lse: torch.Tensor | None = None,
    ) -> None:
        store = self.store
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else store.text_len
        if text_len is None:
            raise ShapeError(
                "single-stream block reached without a text length: register with register_attention_capture "
                "(it hooks the transformer's forward) or set store.text_len"
            )
        if mask is not None and store.mode == "full":
            raise UnsupportedModelError("full-mode capture does not support an attention mask; use mode='partial'")
        n_img = query.shape[1] - text_len
        n = n_img if store.target_tokens is None else store.target_tokens
        if n > n_img:
            raise ShapeError(f"target_tokens = {n} but the block has only {n_img} image tokens")
        lse = None if lse is None else lse[:, :, text_len : text_len + n]
        store.record(self.name, query[:, text_len : text_len + n], key, 1.0 / math.sqrt(query.shape[-1]), text_len, lse)


class UNetCrossAttentionCapture:
    """Wraps a UNet cross-attention processor (default ``AttnProcessor2_0``) and records its ``q.k`` map.

    The output is the inner processor's; ``q`` and ``k`` are read from ``attn.to_q`` / ``attn.to_k``
    during that call (so LoRA deltas on them are included).
    """

    def __init__(self, store: AttentionStore, name: str, inner: Any = None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store, self.name = store, name
        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or not self.store.armed:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None and self.store.mode == "full":
            raise UnsupportedModelError("full-mode capture does not support an attention mask; use mode='partial'")
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            attn.to_q.register_forward_hook(lambda _m, _i, o: seen.__setitem__("q", o)),
            attn.to_k.register_forward_hook(lambda _m, _i, o: seen.__setitem__("k", o)),
        ]
        try:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        q = seen["q"].unflatten(-1, (attn.heads, -1))
        k = seen["k"].unflatten(-1, (attn.heads, -1))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q.transpose(1, 2)).transpose(1, 2)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k.transpose(1, 2)).transpose(1, 2)
        self.store.record(self.name, q, k, float(attn.scale), k.shape[1])
        return out


def _selected(names: Sequence[str], layers: Sequence[str] | str | None) -> list[str]:
    if layers is None:
        return list(names)
    if isinstance(layers, str):
        return [n for n in names if re.search(layers, n)]
    return [n for n in names if any(part in n for part in layers)]


def _remember_text_len(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook on the Flux transformer: single-stream blocks need the text length."""
    enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    module._regionroute_store.text_len = None if enc is None else enc.shape[1]  # type: ignore[union-attr]


def _processors(model: nn.Module) -> dict[str, Any]:
    """A copy of ``model.attn_processors`` (a property of diffusers' attention models)."""
    processors: Any = model.attn_processors
    return dict(processors)


def register_attention_capture(
    model: nn.Module, store: AttentionStore, *, layers: Sequence[str] | str | None = None
) -> list[str]:
    """Install capture processors on ``model``; return the names of the captured layers.

    Flux / Flux Kontext (``FluxTransformer2DModel``): every attention (dual and single stream) or
    those whose processor name contains one of ``layers`` (a regex when a string). UNet
    (``UNet2DConditionModel``): the cross-attention layers (``attn2``), optionally filtered the same way.
    """
    kind = type(model).__name__
    if kind not in ("FluxTransformer2DModel", "UNet2DConditionModel"):
        raise UnsupportedModelError(
            f"attention capture supports FluxTransformer2DModel and UNet2DConditionModel, got {kind}"
        )
    procs = _processors(model)
    originals: dict[str, Any] = getattr(model, "_regionroute_originals", {})
    flux = kind == "FluxTransformer2DModel"
    chosen = _selected([n for n in procs if flux or ".attn2." in n], layers)
    if not chosen:
        raise ConfigError(f"layers={layers!r} selects no attention layer of {kind}; names look like {next(iter(procs))!r}")
    for name in chosen:
        inner = procs[name]
        if isinstance(inner, (FluxAttentionCapture, UNetCrossAttentionCapture)):
            inner = originals[name]  # already captured: wrap the processor found before the first capture
        else:
            originals[name] = inner
        procs[name] = FluxAttentionCapture(store, name) if flux else UNetCrossAttentionCapture(store, name, inner)
    model.set_attn_processor(procs)  # type: ignore[operator]
    model._regionroute_originals = originals  # type: ignore[assignment]
    if flux:
        model._regionroute_store = store  # type: ignore[assignment]
        if getattr(model, "_regionroute_text_hook", None) is None:
            model._regionroute_text_hook = model.register_forward_pre_hook(_remember_text_len, with_kwargs=True)  # type: ignore[assignment]
    return chosen


def remove_attention_capture(model: nn.Module) -> None:
    """Put back the processors that :func:`register_attention_capture` replaced (the very objects) and
    remove the text-length hook; the model is then as it was before the first capture."""
    originals: dict[str, Any] = getattr(model, "_regionroute_originals", {})
    procs = _processors(model)
    for name, proc in procs.items():
        if isinstance(proc, (FluxAttentionCapture, UNetCrossAttentionCapture)):
            procs[name] = originals[name]
    model.set_attn_processor(procs)  # type: ignore[operator]
    hook = getattr(model, "_regionroute_text_hook", None)
    if hook is not None:
        hook.remove()
    for attr in ("_regionroute_originals", "_regionroute_store", "_regionroute_text_hook"):
        if attr in model.__dict__:
            delattr(model, attr)


def capture_installed(model: nn.Module) -> bool:
    """Whether any attention processor of ``model`` is a capture processor."""
    return any(isinstance(p, (FluxAttentionCapture, UNetCrossAttentionCapture)) for p in _processors(model).values())


__all__ = [
    "MODES",
    "AttentionStore",
    "FluxAttentionCapture",
    "UNetCrossAttentionCapture",
    "capture_installed",
    "register_attention_capture",
    "remove_attention_capture",
]
