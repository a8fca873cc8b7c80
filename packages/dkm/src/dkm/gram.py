"""Gram blocks (inducing block, test-inducing block, test diagonal) and the input layer G0 = X X^T / N0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klcore.errors import DTypeError, NonFiniteError, ShapeError


@dataclass
class GramBlocks:
    """The three pieces of a Gram (or kernel) matrix a DKM ever needs; the full test block is never formed.

    ``ii``: ``[P_i, P_i]`` inducing block; ``ti``: ``[P_t, P_i]`` test-inducing block or None;
    ``t``: ``[P_t]`` test diagonal or None (None when only the inducing block is propagated).
    """

    ii: torch.Tensor
    ti: torch.Tensor | None = None
    t: torch.Tensor | None = None


def check_inputs(x: torch.Tensor, name: str = "x", features: int | None = None) -> torch.Tensor:
    """Validate a ``[P, N0]`` floating input matrix (finite, 2-D, ``features`` columns when given)."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}; convert with torch.as_tensor")
    if not x.is_floating_point():
        raise DTypeError(f"{name} must be floating point (float64 by default), got {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ShapeError(f"{name} must be [points, features] with both > 0, got shape {tuple(x.shape)}")
    if features is not None and x.shape[1] != features:
        raise ShapeError(f"{name} has {x.shape[1]} features, the model was built for {features}")
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{name} holds NaN or infinite values; impute or drop them first")
    return x


def input_gram(inducing: torch.Tensor, x: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> GramBlocks:
    """Input layer G0 = X S^2 X^T / N0 from inducing inputs ``[P_i, N0]`` and optional test inputs ``[P_t, N0]``;
    ``scales [N0]`` (S = diag(scales), ARD) defaults to ones: G0 = X X^T / N0."""
    n0 = inducing.shape[-1]
    if scales is not None:
        if scales.shape != (n0,):
            raise ShapeError(f"input scales must be [{n0}] (one per input feature), got {tuple(scales.shape)}")
        inducing = inducing * scales
        x = None if x is None else x * scales
    ii = inducing @ inducing.T / n0
    if x is None:
        return GramBlocks(ii)
    return GramBlocks(ii, x @ inducing.T / n0, (x * x).sum(-1) / n0)


__all__ = ["GramBlocks", "check_inputs", "input_gram"]
