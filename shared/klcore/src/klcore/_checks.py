"""Input validation shared by the public functions (private)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from klcore.errors import DTypeError, MaskError, NonFiniteError, ShapeError


def tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a tensor, else raise a ``DTypeError`` naming the argument."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x: object, name: str) -> torch.Tensor:
    t = tensor(x, name)
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def min_dims(x: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    if x.dim() < ndim:
        raise ShapeError(f"{name} must have at least {ndim} dimensions {layout}, got shape {tuple(x.shape)}")


def exact_dims(x: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    if x.dim() != ndim:
        raise ShapeError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")


def same_shape(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(
            f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}; they must match"
        )


def finite(x: torch.Tensor, name: str) -> None:
    """Raise ``NonFiniteError`` if ``x`` holds NaN or +-inf, naming the first bad index."""
    ok = torch.isfinite(x)
    if not bool(ok.all()):
        bad = tuple(int(i) for i in (~ok).nonzero()[0].tolist())
        raise NonFiniteError(
            f"{name} contains NaN or inf (first at index {bad}, value {x[bad].item()}); "
            "check the upstream computation (overflow in half precision, log of zero, division by zero)"
        )


def mask(m: object, name: str, shape: Sequence[int], *, allow_empty: bool = False) -> torch.Tensor:
    """Validate a 0/1 or boolean mask of ``shape`` and return it as a boolean tensor."""
    t = tensor(m, name)
    if tuple(t.shape) != tuple(shape):
        raise MaskError(f"{name} has shape {tuple(t.shape)} but must match the values' shape {tuple(shape)}")
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise MaskError(f"{name} must be boolean or hold only 0 and 1")
        t = t != 0
    if not allow_empty and not bool(t.any()):
        raise MaskError(f"{name} selects no element; pass at least one valid token (or skip this batch)")
    return t
