"""Structure diagnostics of a layer's barriers: is there anything beyond per-expert costs for the topology to find?

``additive_fit_r2``: how much of the pair barriers ``b_ij`` a per-expert cost explains (``b_ij ~ u_i + u_j``, least
squares); near 1 means merging cost is a property of single experts and pairs carry no interaction.
``triplet_pair_ratio``: median of ``b_ijk / (b_ij + b_ik + b_jk)`` over the candidate triangles; 1 means a triple
costs the sum of its pairs (no higher-order obstruction for a triangle term to cover).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from klcore.errors import ShapeError


def additive_fit_r2(num_experts: int, pairs: Sequence[tuple[int, int]], values: ArrayLike) -> float:
    """``R^2`` of the least-squares fit ``b_ij ~ u_i + u_j`` (with ``|pairs|`` values; 1.0 for constant values)."""
    b = np.asarray(values, dtype=np.float64)
    if b.shape != (len(pairs),):
        raise ShapeError(f"need one value per pair: {b.shape} for {len(pairs)} pairs")
    design = np.zeros((len(pairs), num_experts))
    for row, (i, j) in enumerate(pairs):
        design[row, i] += 1.0
        design[row, j] += 1.0
    u = np.linalg.lstsq(design, b, rcond=None)[0]
    total = float(((b - b.mean()) ** 2).sum())
    return 1.0 - float(((b - design @ u) ** 2).sum()) / total if total > 0 else 1.0


def triplet_pair_ratio(
    pairs: Sequence[tuple[int, int]], values: ArrayLike, triangles: Sequence[tuple[int, int, int]],
    triangle_barriers: ArrayLike,
) -> float:
    """Median over ``triangles`` of ``b_ijk / (b_ij + b_ik + b_jk)`` (NaN without triangles with positive pairs)."""
    look = dict(zip((tuple(sorted(p)) for p in pairs), np.asarray(values, dtype=np.float64)))
    tb = np.asarray(triangle_barriers, dtype=np.float64)
    if tb.shape != (len(triangles),):
        raise ShapeError(f"need one barrier per triangle: {tb.shape} for {len(triangles)} triangles")
    ratios = []
    for t, v in zip(triangles, tb):
        i, j, k = sorted(t)
        denominator = look[(i, j)] + look[(i, k)] + look[(j, k)]
        if denominator > 0:
            ratios.append(v / denominator)
    return float(np.median(ratios)) if ratios else float("nan")


__all__ = ["additive_fit_r2", "triplet_pair_ratio"]
