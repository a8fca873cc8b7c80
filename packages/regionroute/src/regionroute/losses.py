"""Focus and Cover attention losses (RegionRoute), per sample and per object with that sample's own mask."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from klcore.errors import ConfigError, DTypeError, MaskError, NonFiniteError, ShapeError

AVERAGING = ("layer", "maps")
NORMALIZATIONS = ("none", "max")


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


def layer_grid(num_queries: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The grid of a layer with ``num_queries`` queries when the finest layer's grid is ``grid`` (UNet
    levels halve it, rounding down or up)."""
    h, w = grid
    for k in range(16):
        f = 2**k
        for cand in ((h // f, w // f), (-(-h // f), -(-w // f))):
            if cand[0] * cand[1] == num_queries:
                return cand
    raise ShapeError(f"a layer has {num_queries} image queries, which is no downsampling of the {h}x{w} token grid")


def check_mask_aspect(mask_hw: tuple[int, int], grid: tuple[int, int]) -> None:
    """Masks must have the token grid's aspect: the grid their aspect implies for ``h * w`` queries must be
    ``grid``; a transposed mask on a non-square grid raises ``ShapeError``."""
    try:
        implied: tuple[int, int] | None = grid_for(grid[0] * grid[1], *mask_hw)
    except ShapeError:
        implied = None
    if implied != tuple(grid):
        hint = " (transposed? masks are [B, O, H, W])" if implied == (grid[1], grid[0]) else ""
        raise ShapeError(f"masks are {mask_hw[0]}x{mask_hw[1]} but the token grid is {grid[0]}x{grid[1]}: the aspects differ{hint}")


def warn_vanished(masks: torch.Tensor, small: torch.Tensor, token_objects: torch.Tensor, grid: tuple[int, int]) -> None:
    """Warn when a supervised object's mask is non-empty at full size but covers no cell of ``grid``."""
    full = masks.flatten(2).amax(-1) > 0  # [B, O]
    lost = full & (small.amax(-1) == 0)
    used = torch.zeros_like(full)
    for b in range(token_objects.shape[0]):
        used[b, token_objects[b][token_objects[b] >= 0]] = True
    lost &= used
    if lost.any():
        pairs = [tuple(map(int, p)) for p in lost.nonzero()[:4]]
        warnings.warn(
            f"{int(lost.sum())} object mask(s) (sample, object) {pairs}{'...' if lost.sum() > 4 else ''} cover no cell "
            f"of the {grid[0]}x{grid[1]} token grid after the nearest resize (objects thinner than a cell vanish): "
            "their Focus target becomes uniform and Cover asks for no attention; dilate thin masks or drop them",
            RuntimeWarning,
            stacklevel=3,
        )


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
    grid: tuple[int, int] | None = None,
    normalize: str = "none",
) -> tuple[torch.Tensor, dict[str, float]]:
    """RegionRoute's attention loss ``lambda_focus * Focus + lambda_cover * Cover``.

    ``maps``: per layer ``[B, N, S]`` (N may differ per layer: UNet resolutions); ``masks [B, O, H, W]``
    in [0, 1] with the image's aspect; ``token_objects [B, S]``: the object of each selected token
    column (``-1`` for padding). Each token's loss uses its own sample's mask of its object; tokens,
    then objects, then samples (those with tokens), then layers are averaged. ``average="maps"``
    averages the maps over layers first (the paper's order; needs one N), ``"layer"`` (the
    reference code's order) takes the loss per layer. ``grid``: the ``(h, w)`` token grid of the finest
    layer (Flux: the packed latent grid; UNet: the latent grid). With it, masks whose aspect is not the
    grid's (a transposed mask) raise ``ShapeError``; without it the grid is inferred from the masks' aspect,
    which cannot tell a transposed mask on a non-square grid. A supervised object that covers no cell of a
    layer's grid gives a ``RuntimeWarning``. ``normalize="max"`` divides each token's map by its maximum
    over the image queries before ``tau`` / ``alpha`` act (full-softmax maps are near ``1 / (L + 2N)``,
    where the reference's ``tau = 0.1``, ``alpha = 2`` see uniform attention); ``"none"`` as the reference.
    """
    if average not in AVERAGING:
        raise ConfigError(f"average must be one of {AVERAGING}, got {average!r}")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
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
    if grid is not None:
        check_mask_aspect((masks.shape[2], masks.shape[3]), grid)
    for amap in maps:
        if grid is None:
            level = grid_for(amap.shape[1], masks.shape[2], masks.shape[3])
        else:
            level = layer_grid(amap.shape[1], grid)
        small = masks_on_grid(masks, level)  # [B, O, N]
        warn_vanished(masks, small, token_objects, level)
        per_token = torch.gather(small, 1, obj[:, :, None].expand(-1, -1, small.shape[2]))  # [B, S, N]
        attn = amap.transpose(1, 2)  # [B, S, N]
        if normalize == "max":
            attn = attn / attn.amax(-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
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
    "NORMALIZATIONS",
    "cover_loss",
    "focus_loss",
    "check_mask_aspect",
    "grid_for",
    "layer_grid",
    "masks_on_grid",
    "region_attention_loss",
    "token_weights",
    "warn_vanished",
]
