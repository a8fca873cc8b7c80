"""Edge orientation of the unsigned barrier cochain, chosen by a property of the experts rather than their numbers.

The complex stores every edge as ``(i, j)``, ``i < j``, oriented ``i -> j`` (``complex``). A barrier has no sign, so
which way an edge points is a choice, and the Hodge energy split depends on it. ``edge_orientation`` gives the sign
``s_e`` of each stored edge: the barrier flows from the expert with the lower score to the one with the higher score
(``s_e = -1`` when that is ``j -> i``), so renumbering the experts permutes the decomposition instead of changing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from klcore.errors import ConfigError, ShapeError

ORIENTATIONS = ("frequency", "saliency", "index")


def expert_scores(kind: str, frequencies: ArrayLike, saliency: ArrayLike) -> np.ndarray:
    """``[E, 2]`` sort keys: ``frequency`` = (routing frequency, REAP saliency), ``saliency`` = the reverse."""
    f, s = np.asarray(frequencies, dtype=np.float64), np.asarray(saliency, dtype=np.float64)
    if f.shape != s.shape or f.ndim != 1:
        raise ShapeError(f"frequencies {f.shape} and saliency {s.shape} must both be [E]")
    return np.stack([f, s] if kind == "frequency" else [s, f], 1)


def edge_orientation(
    edges: Sequence[tuple[int, int]], kind: str, frequencies: ArrayLike = (), saliency: ArrayLike = ()
) -> np.ndarray:
    """``[|E|]`` float64 of +-1: the sign turning the stored orientation ``i -> j`` (``i < j``) into ``kind``'s.

    ``frequency`` / ``saliency``: from the expert with the lower (primary, secondary) score to the higher one;
    exact ties on both keys fall back to ``i -> j``. ``index``: the paper's ``i -> j`` for every edge (all +1).
    """
    if kind not in ORIENTATIONS:
        raise ConfigError(f"orientation must be one of {ORIENTATIONS}, got {kind!r}")
    if kind == "index" or not len(edges):
        return np.ones(len(edges))
    keys = expert_scores(kind, frequencies, saliency)
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    a, b = keys[e[:, 0]], keys[e[:, 1]]
    reverse = (a[:, 0] > b[:, 0]) | ((a[:, 0] == b[:, 0]) & (a[:, 1] > b[:, 1]))
    return np.where(reverse, -1.0, 1.0)


__all__ = ["ORIENTATIONS", "edge_orientation", "expert_scores"]
