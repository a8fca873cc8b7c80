"""Focus and Cover attention losses (RegionRoute), per sample and per object with that sample's own mask."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from klcore.errors import ConfigError, DTypeError, MaskError, NonFiniteError, ShapeError

AVERAGING = ("layer", "maps")


def focus_loss(attention: torch.Tensor, mask: torch.Tensor, *, tau: float = 0.1) -> torch.Tensor:
    """``KL(p || softmax(attention / tau))`` over the last dim, ``p = mask / sum(mask)``; ``[..., N] -> [...]``.

    An empty mask gives a uniform ``p`` (as the reference code). Float32 (float64 inputs stay float64).
    """
    if tau <= 0:
        raise ConfigError(f"tau must be > 0, got {tau}")
    if attention.shape != mask.shape:
        raise ShapeError(f"attention {tuple(attention.shape)} and mask {tuple(mask.shape)} must have one shape")
    dtype = torch.promote_types(attention.dtype, torch.float32)
    m = mask.to(dtype)
    total = m.sum(-1, keepdim=True)
    p = torch.where(total > 0, m / total.clamp_min(1e-12), torch.full_like(m, 1.0 / m.shape[-1]))
    log_q = torch.log_softmax(attention.to(dtype) / tau, dim=-1)
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def cover_loss(attention: torch.Tensor, mask: torch.Tensor, *, alpha: float = 2.0) -> torch.Tensor:
    """``mean_N BCE_with_logits(alpha * attention, mask)``; ``[..., N] -> [...]``. Float32 (float64 stays)."""
    if attention.shape != mask.shape:
        raise ShapeError(f"attention {tuple(attention.shape)} and mask {tuple(mask.shape)} must have one shape")
    dtype = torch.promote_types(attention.dtype, torch.float32)
    logits = alpha * attention.to(dtype)
    return F.binary_cross_entropy_with_logits(logits, mask.to(dtype), reduction="none").mean(-1)


def masks_on_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Masks ``[B, O, H, W]`` resized (nearest) to ``grid`` and binarised ``> 0``: ``[B, O, h*w]`` float32."""
    small = F.interpolate(masks.float(), size=grid, mode="nearest")
    return (small > 0).float().flatten(2)


def grid_for(num_queries: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``num_queries`` image queries for an image of aspect ``height x width``."""
    factor = math.sqrt(height * width / num_queries)
    grid = (round(height / factor), round(width / factor))
    if grid[0] * grid[1] != num_queries:
        raise ShapeError(
            f"{num_queries} image queries do not form a grid of aspect {height}x{width}; "
            "pass masks with the image's aspect ratio"
        )
    return grid


def _check_inputs(maps: Sequence[torch.Tensor], masks: torch.Tensor, token_objects: torch.Tensor) -> None:
    if not maps:
        raise ShapeError("no attention maps given: record some with an AttentionStore first")
    if masks.dim() != 4:
        raise ShapeError(f"masks must be [B, O, H, W], got shape {tuple(masks.shape)}")
    if not torch.isfinite(masks).all():
        raise NonFiniteError("masks hold NaN or inf")
    if (masks < 0).any() or (masks > 1).any():
        raise MaskError("masks must lie in [0, 1]; divide 8-bit masks by 255")
    if token_objects.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"token_objects must be an integer tensor, got {token_objects.dtype}")
    if token_objects.dim() != 2 or token_objects.shape[0] != masks.shape[0]:
        raise ShapeError(f"token_objects must be [B={masks.shape[0]}, S], got {tuple(token_objects.shape)}")
    if (token_objects >= masks.shape[1]).any():
        raise ShapeError(f"token_objects name object {int(token_objects.max())} but masks have {masks.shape[1]} objects")
    for m in maps:
        if not torch.isfinite(m).all():
            raise NonFiniteError("attention maps hold NaN or inf; check the model's precision (use float32 capture)")
        if m.dim() != 3 or m.shape[0] != masks.shape[0] or m.shape[2] != token_objects.shape[1]:
            raise ShapeError(
                f"each map must be [B={masks.shape[0]}, N, S={token_objects.shape[1]}], got {tuple(m.shape)}"
            )


def token_weights(token_objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[B, S]`` that average over each object's tokens, then over the sample's objects, and
    the ``[B]`` flag of samples that have any token (padding columns are ``-1``)."""
    valid = token_objects >= 0
    weights = torch.zeros(token_objects.shape, dtype=torch.float32, device=token_objects.device)
    for b in range(token_objects.shape[0]):
        objects = torch.unique(token_objects[b][valid[b]])
        for o in objects:
            sel = token_objects[b] == o
            weights[b, sel] = 1.0 / (int(sel.sum()) * len(objects))
    return weights, valid.any(1)


def region_attention_loss(
    maps: Sequence[torch.Tensor] | torch.Tensor,
    masks: torch.Tensor,
    token_objects: torch.Tensor,
    *,
    tau: float = 0.1,
    alpha: float = 2.0,
    lambda_focus: float = 0.1,
    lambda_cover: float = 5e-5,
    average: str = "layer",
) -> tuple[torch.Tensor, dict[str, float]]:
    """RegionRoute's attention loss ``lambda_focus * Focus + lambda_cover * Cover``.

    ``maps``: per layer ``[B, N, S]`` (N may differ per layer: UNet resolutions); ``masks [B, O, H, W]``
    in [0, 1] with the image's aspect; ``token_objects [B, S]``: the object of each selected token
    column (``-1`` for padding). Each token's loss uses its own sample's mask of its object; tokens,
    then objects, then samples (those with tokens), then layers are averaged. ``average="maps"``
    averages the maps over layers first (the paper's order; needs one N), ``"layer"`` (the
    reference code's order) takes the loss per layer.
    """
    if average not in AVERAGING:
        raise ConfigError(f"average must be one of {AVERAGING}, got {average!r}")
    maps = list(maps.unbind(0)) if isinstance(maps, torch.Tensor) else list(maps)
    _check_inputs(maps, masks, token_objects)
    if average == "maps":
        if len({m.shape for m in maps}) != 1:
            raise ShapeError("average='maps' needs maps of one resolution; use average='layer'")
        maps = [torch.stack(maps).mean(0)]
    weights, has_tokens = token_weights(token_objects)
    if not has_tokens.any():
        raise MaskError("no sample has a selected token: every token_objects entry is -1")
    obj = token_objects.clamp_min(0)
    focus_terms, cover_terms = [], []
    for amap in maps:
        grid = grid_for(amap.shape[1], masks.shape[2], masks.shape[3])
        small = masks_on_grid(masks, grid)  # [B, O, N]
        per_token = torch.gather(small, 1, obj[:, :, None].expand(-1, -1, small.shape[2]))  # [B, S, N]
        attn = amap.transpose(1, 2)  # [B, S, N]
        f = (focus_loss(attn, per_token, tau=tau) * weights).sum(1)
        c = (cover_loss(attn, per_token, alpha=alpha) * weights).sum(1)
        focus_terms.append(f[has_tokens].mean())
        cover_terms.append(c[has_tokens].mean())
    focus = torch.stack(focus_terms).mean()
    cover = torch.stack(cover_terms).mean()
    loss = lambda_focus * focus + lambda_cover * cover
    return loss, {"attn/focus": float(focus.detach()), "attn/cover": float(cover.detach()), "attn/loss": float(loss.detach())}


__all__ = [
    "AVERAGING",
    "cover_loss",
    "focus_loss",
    "grid_for",
    "masks_on_grid",
    "region_attention_loss",
    "token_weights",
]
