"""Critical simplices, the greedy coverage objective, budgets, router redirection and retained Hodge mass."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

from klcore.errors import ConfigError, DataError, ShapeError


def experts_to_keep(num_experts: int, ratio: float, top_k: int = 1) -> int:
    """Uniform per-layer budget: ``E - round(ratio * E)`` survivors; must stay >= ``top_k``."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) < 1.0:
        raise ConfigError(f"ratio (fraction of experts removed) must be a number in (0, 1), got {ratio!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
        raise ConfigError(f"num_experts must be a positive integer, got {num_experts!r}")
    keep = num_experts - round(ratio * num_experts)
    if keep < max(top_k, 1):
        raise ConfigError(
            f"ratio {ratio} keeps {keep} of {num_experts} experts, fewer than top_k={top_k} routed per token; "
            f"use a ratio <= {1 - top_k / num_experts:.3f}"
        )
    return keep


def _top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction must lie in [0, 1], got {fraction!r}")
    count = min(len(scores), math.ceil(fraction * len(scores)))
    return np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:count]


def critical_edges(edges: Sequence[tuple[int, int]], harmonic: ArrayLike, fraction: float) -> list[tuple[int, int]]:
    """``E*``: the top ``fraction`` (rounded up) of ``edges`` by ``|harmonic|``."""
    h = np.abs(np.asarray(harmonic, dtype=float))
    if h.shape != (len(edges),):
        raise ShapeError(f"need one harmonic value per edge: {h.shape} for {len(edges)} edges")
    return [tuple(edges[i]) for i in _top_fraction(h, fraction)]  # type: ignore[misc]


def critical_triangles(
    triangles: Sequence[tuple[int, int, int]], barriers: ArrayLike, fraction: float
) -> list[tuple[int, int, int]]:
    """``T*``: the top ``fraction`` (rounded up) of candidate ``triangles`` by ``|b_ijk|``."""
    b = np.abs(np.asarray(barriers, dtype=float))
    if b.shape != (len(triangles),):
        raise ShapeError(f"need one barrier per triangle: {b.shape} for {len(triangles)} triangles")
    return [tuple(triangles[i]) for i in _top_fraction(b, fraction)]  # type: ignore[misc]


def coverage_objective(
    selected: Sequence[int],
    saliency: ArrayLike,
    edges: Sequence[Sequence[int]],
    triangles: Sequence[Sequence[int]],
    *,
    lambda_edge: float = 1.0,
    lambda_triangle: float = 1.0,
) -> float:
    """``Phi(S) = sum_{i in S} sal(i) + lambda_e |E* hit by S| / |E*| + lambda_t |T* hit by S| / |T*|``.

    "Hit" means the simplex shares at least one vertex with ``S``: with non-negative saliency this makes
    ``Phi`` monotone submodular (a weighted coverage function plus a modular one).
    """
    s = set(int(v) for v in selected)
    sal = np.asarray(saliency, dtype=float)
    value = float(sum(sal[i] for i in s))
    if edges:
        value += lambda_edge * sum(1 for e in edges if s.intersection(e)) / len(edges)
    if triangles:
        value += lambda_triangle * sum(1 for t in triangles if s.intersection(t)) / len(triangles)
    return value


def greedy_cover(
    num_experts: int,
    keep: int,
    saliency: ArrayLike,
    edges: Sequence[Sequence[int]] = (),
    triangles: Sequence[Sequence[int]] = (),
    *,
    lambda_edge: float = 1.0,
    lambda_triangle: float = 1.0,
) -> list[int]:
    """Greedy maximisation of ``coverage_objective`` to ``keep`` experts (ties: lowest index); sorted survivors.

    ``saliency [E]`` must be finite and >= 0 (the (1 - 1/e) guarantee needs it).
    """
    sal = np.asarray(saliency, dtype=float)
    if sal.shape != (num_experts,):
        raise ShapeError(f"saliency has shape {sal.shape}, expected ({num_experts},)")
    if not np.all(np.isfinite(sal)) or (sal < 0).any():
        raise DataError("saliency must be finite and >= 0; min-max normalise it first")
    if not 1 <= keep <= num_experts:
        raise ConfigError(f"keep must lie in 1..{num_experts}, got {keep}")
    if lambda_edge < 0 or lambda_triangle < 0:
        raise ConfigError(f"lambda_edge and lambda_triangle must be >= 0, got {lambda_edge}, {lambda_triangle}")
    edge_w = lambda_edge / len(edges) if edges else 0.0
    tri_w = lambda_triangle / len(triangles) if triangles else 0.0
    simplices = [(set(map(int, e)), edge_w) for e in edges] + [(set(map(int, t)), tri_w) for t in triangles]
    covered = [False] * len(simplices)
    selected: list[int] = []
    for _ in range(keep):
        best, best_gain = -1, -math.inf
        for i in range(num_experts):
            if i in selected:
                continue
            gain = sal[i] + sum(w for (s, w), c in zip(simplices, covered) if not c and i in s)
            if gain > best_gain:
                best, best_gain = i, gain
        selected.append(best)
        covered = [c or best in s for (s, _), c in zip(simplices, covered)]
    return sorted(selected)


def minmax(values: ArrayLike) -> np.ndarray:
    """Per-layer min-max normalisation to [0, 1] (all zeros when the values are constant)."""
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=float)
    span = v.max() - v.min() if v.size else 0.0
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def redirect_map(
    num_experts: int,
    keep: Sequence[int],
    pair_barriers: dict[tuple[int, int], float],
    harmonic: dict[tuple[int, int], float] | None = None,
    *,
    alpha: float = 1.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``redirect [E]`` int64: survivor ``keep[r]`` maps to ``r``; a dropped expert ``i`` maps to the position of
    ``argmin_{j in S} b_ij (1 + alpha |h_ij| / max(||b||, eps))``. Pairs absent from ``harmonic`` (edges outside
    the complex at the chosen threshold) count with ``h = 0``."""
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    keep = sorted(int(k) for k in keep)
    harmonic = harmonic or {}
    norm = max(math.sqrt(sum(v * v for v in pair_barriers.values())), eps)
    out = torch.empty(num_experts, dtype=torch.long)
    position = {j: r for r, j in enumerate(keep)}
    for i in range(num_experts):
        if i in position:
            out[i] = position[i]
            continue
        costs = []
        for j in keep:
            e = (min(i, j), max(i, j))
            if e not in pair_barriers:
                raise DataError(f"no pair barrier for experts {e}; compute all pairs before redirecting")
            costs.append(pair_barriers[e] * (1 + alpha * abs(harmonic.get(e, 0.0)) / norm))
        out[i] = position[keep[int(np.argmin(costs))]]
    return out


def retained_mass(
    keep: Sequence[int],
    edges: Sequence[tuple[int, int]],
    components: Mapping[str, ArrayLike],
    triangles: Sequence[tuple[int, int, int]] = (),
    triangle_barriers: ArrayLike = (),
) -> dict[str, float]:
    """Share of each component's energy on simplices inside the kept set:
    ``rho_c = sum_{e in S} c_e^2 / sum_e c_e^2`` for each edge component and ``rho_triangle`` for ``b_ijk``.
    A component with zero energy retains 1."""
    s = set(int(k) for k in keep)
    inside = np.array([set(e) <= s for e in edges], dtype=bool)
    out = {}
    for name, values in components.items():
        c2 = np.asarray(values, dtype=float) ** 2
        if c2.shape != (len(edges),):
            raise ShapeError(f"component {name!r} has shape {c2.shape}, expected ({len(edges)},): one value per edge")
        total = c2.sum()
        out[name] = float(c2[inside].sum() / total) if total > 0 else 1.0
    if len(triangles):
        t2 = np.asarray(triangle_barriers, dtype=float) ** 2
        if t2.shape != (len(triangles),):
            raise ShapeError(f"triangle_barriers has shape {t2.shape}, expected ({len(triangles)},): one barrier "
                             "per triangle")
        tin = np.array([set(t) <= s for t in triangles], dtype=bool)
        out["triangle"] = float(t2[tin].sum() / t2.sum()) if t2.sum() > 0 else 1.0
    return out


__all__ = [
    "coverage_objective",
    "critical_edges",
    "critical_triangles",
    "experts_to_keep",
    "greedy_cover",
    "minmax",
    "redirect_map",
    "retained_mass",
]
