"""Jitter setting and a Cholesky factorisation that retries with growing jitter, then raises NotPSDError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from klcore.errors import ConfigError, NonFiniteError, NotPSDError, ShapeError

_KERNEL_JITTER = [1e-6]


def get_jitter() -> float:
    """The relative kernel jitter eps: every kernel returns K_aa (1 + eps) + eps on its diagonals."""
    return _KERNEL_JITTER[0]


@contextlib.contextmanager
def jitter(value: float) -> Iterator[None]:
    """Use kernel jitter ``value`` (default 1e-6) inside the ``with`` block; 0 switches it off."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number >= 0.0:
        raise ConfigError(f"jitter must be a number >= 0, got {value!r}; pass for example 1e-6")
    old = _KERNEL_JITTER[0]
    _KERNEL_JITTER[0] = number
    try:
        yield
    finally:
        _KERNEL_JITTER[0] = old


def safe_cholesky(matrix: torch.Tensor, *, name: str = "matrix", max_tries: int = 3) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric ``[P, P]`` matrix.

    On failure, retries with ``jitter * mean(diag)`` added to the diagonal, jitter = 1e-8, 1e-7, ...
    (1e-6, 1e-5, ... in float32) for ``max_tries`` tries, then raises NotPSDError naming ``name``.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ShapeError(f"{name} must be a square [P, P] matrix, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise NonFiniteError(f"{name} holds NaN or infinite values; check the inputs and the learning rate")
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor
    base = 1e-8 if matrix.dtype == torch.float64 else 1e-6
    scale = matrix.diagonal().abs().mean().clamp_min(torch.finfo(matrix.dtype).tiny)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    added = 0.0
    for k in range(max_tries):
        added = base * 10.0**k
        factor, info = torch.linalg.cholesky_ex(matrix + (added * scale) * eye)
        if int(info) == 0:
            return factor
    min_eig = float(torch.linalg.eigvalsh(matrix.detach()).min())
    raise NotPSDError(
        f"{name} ({matrix.shape[0]}x{matrix.shape[0]}) is not positive definite: smallest eigenvalue {min_eig:.3g}, "
        f"still failing with jitter {added:.0e} x mean diagonal after {max_tries} tries; use float64, a smaller "
        "learning rate, a larger kernel jitter (dkm.jitter) or fewer/distinct inducing points"
    )


__all__ = ["get_jitter", "jitter", "safe_cholesky"]
