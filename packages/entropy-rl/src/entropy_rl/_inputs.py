"""Validation of per-token inputs (private): klcore errors that say what was given and what is expected."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from klcore.errors import DTypeError, MaskError, NonFiniteError, ShapeError


def check_tokens(
    tensors: Mapping[str, torch.Tensor], mask: torch.Tensor, *, allow_empty: bool = True, finite: bool = True
) -> torch.Tensor:
    """Check ``[B, T]`` floating tensors of one shape (and, with ``finite``, finite at valid positions);
    return the mask as bool."""
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise DTypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2:
            raise ShapeError(f"{name} must have 2 dimensions [B, T], got shape {tuple(t.shape)}")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            first = next(iter(tensors))
            raise ShapeError(f"{name} has shape {tuple(t.shape)} but {first} has shape {tuple(shape)}; they must match")
    if not isinstance(mask, torch.Tensor):
        raise DTypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if shape is not None and mask.shape != shape:
        raise MaskError(f"mask has shape {tuple(mask.shape)} but the values have shape {tuple(shape)}; they must match")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise MaskError("mask must be boolean or hold only 0 and 1")
        mask = mask != 0
    if not allow_empty and not bool(mask.any()):
        raise MaskError("mask selects no token; pass at least one valid token (or skip this batch)")
    if finite:
        for name, t in tensors.items():
            check_finite(t, mask, name)
    return mask


def check_finite(t: torch.Tensor, valid: torch.Tensor, name: str) -> None:
    """Raise ``NonFiniteError`` if ``t`` holds NaN or inf at a valid position, naming the first one."""
    bad = valid & ~torch.isfinite(t.detach())
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise NonFiniteError(
            f"{name} is NaN or inf at valid position {where} (value {t[where].item()}); "
            "check the upstream computation (reward scaling, division by a zero group std, overflow)"
        )
