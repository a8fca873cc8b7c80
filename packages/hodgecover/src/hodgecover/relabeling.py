"""Relabeling-spread diagnostic: how much a layer's Hodge split and survivor set move when experts are renumbered.

A method that does not depend on expert numbering gives the same harmonic share and the same survivors (mapped
back to the original numbers) under every renumbering. The barriers are reused (a renumbering does not change them);
everything after them (filtration, orientation, decomposition, selection) is recomputed on the renumbered layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hodgecover.barriers import LayerStats
from hodgecover.pipeline import HodgeCoverConfig, LayerAnalysis, build_analysis, select_layer
from hodgecover.selection import experts_to_keep
from klcore.errors import ConfigError

SPREAD_METHODS = ("hodgecover", "no-triangle", "greedy-barrier", "reap", "frequency")


def relabel(analysis: LayerAnalysis, perm: np.ndarray, config: HodgeCoverConfig) -> LayerAnalysis:
    """The analysis of the same layer with expert ``i`` renamed ``perm[i]`` (barriers reused, rest recomputed)."""
    n = analysis.num_experts
    pair_value = {tuple(sorted((int(perm[i]), int(perm[j])))): v for (i, j), v in zip(analysis.pairs, analysis.pair_barriers)}
    pairs = sorted(pair_value)
    tri_value = {tuple(sorted(int(perm[v]) for v in t)): b for t, b in zip(analysis.triangles, analysis.triangle_barriers)}
    tris = sorted(tri_value)
    inverse = torch.as_tensor(np.argsort(perm))  # new label -> old label

    def move(t: torch.Tensor) -> torch.Tensor:
        return t[inverse] if t.dim() >= 1 and t.shape[0] == n else t

    stats = LayerStats(**{k: move(getattr(analysis.stats, k)) for k in
                          ("frequencies", "reap", "input_sq", "hidden_sq", "mean_output")},
                       linear_input_sq=analysis.stats.linear_input_sq)
    return build_analysis(analysis.layer, n, analysis.top_k, pairs, np.array([pair_value[p] for p in pairs]), tris,  # type: ignore[arg-type]
                          np.array([tri_value[t] for t in tris]), stats, config, warn=False)


def harmonic_share(analysis: LayerAnalysis) -> float:
    e = analysis.parts.energies
    return e["harmonic"] / max(e["total"], 1e-300)


def relabeling_spread(
    analysis: LayerAnalysis, config: HodgeCoverConfig, ratio: float, *, methods: tuple[str, ...] = SPREAD_METHODS,
    relabelings: int | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Over ``relabelings`` random renumberings (default ``config.relabelings``) plus the identity: the range of the
    harmonic energy share, and per method the number of distinct survivor sets (in original numbers; 1 means
    numbering-free) and the smallest Jaccard overlap with the unrenumbered survivors."""
    bad = [m for m in methods if m not in SPREAD_METHODS]
    if bad:
        raise ConfigError(f"relabeling_spread supports {SPREAD_METHODS}, got {bad}")
    count = config.relabelings if relabelings is None else relabelings
    keep = experts_to_keep(analysis.num_experts, ratio, analysis.top_k)
    rng = np.random.default_rng(seed)
    shares = [harmonic_share(analysis)]
    base = {m: select_layer(analysis, m, keep, config, generator=rng) for m in methods}
    sets: dict[str, set[tuple[int, ...]]] = {m: {tuple(s)} for m, s in base.items()}
    jaccard = {m: 1.0 for m in methods}
    for _ in range(count):
        perm = rng.permutation(analysis.num_experts)
        other = relabel(analysis, perm, config)
        shares.append(harmonic_share(other))
        for m in methods:
            chosen = {int(np.flatnonzero(perm == s)[0]) for s in select_layer(other, m, keep, config, generator=rng)}
            sets[m].add(tuple(sorted(chosen)))
            jaccard[m] = min(jaccard[m], len(chosen & set(base[m])) / len(chosen | set(base[m])))
    return {
        "relabelings": count,
        "harmonic_share": shares[0],
        "harmonic_share_min": float(min(shares)),
        "harmonic_share_max": float(max(shares)),
        **{f"{m}/distinct_sets": len(sets[m]) for m in methods},
        **{f"{m}/min_jaccard": jaccard[m] for m in methods},
    }


__all__ = ["SPREAD_METHODS", "harmonic_share", "relabel", "relabeling_spread"]
