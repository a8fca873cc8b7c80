"""HodgeCover end to end: per-layer analysis (barriers, complex, Hodge parts), selection by method, application.

``analyze_layer`` builds the per-layer complex once; ``plan`` selects survivors for one method and ratio from
those analyses (so several ratios and methods share one barrier computation); ``apply_plan`` edits the model.
Every choice the method notes leave open is a field of ``HodgeCoverConfig`` with a documented default.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from torch import nn

from hodgecover.barriers import BarrierConfig, BarrierEngine, LayerStats, candidate_triangles
from hodgecover.complex import (
    BACKENDS,
    FILTRATION_MODES,
    SOLVERS,
    Filtration,
    HodgeDecomposition,
    SimplicialComplex,
    decompose,
    filtration_complex,
)
from hodgecover.complex import filtration as beta_curve
from hodgecover.orientation import ORIENTATIONS, edge_orientation
from hodgecover.selection import (
    critical_edges,
    critical_triangles,
    experts_to_keep,
    greedy_cover,
    minmax,
    redirect_map,
    retained_mass,
)
from hodgecover.surgery import apply_redirect, merge_groups, prune_experts, redirect_of_groups
from klcore.errors import ConfigError

METHODS = ("hodgecover", "no-triangle", "greedy-barrier", "reap", "frequency", "random", "hc-smoe")
SALIENCIES = ("reap", "frequency", "none")
TRIPLET_VALUES = ("raw", "excess")
DROPPED = ("prune", "redirect")
TRIANGLE_SAMPLINGS = ("stratified", "median")
SALIENCY_SCALES = ("normalised", "raw")


@dataclass
class HodgeCoverConfig:
    """Options of the method (defaults marked [assumed] were not recoverable from the paper; see the docs).

    ``filtration``: ``joint`` (edges and triangles enter at their barrier; default), ``triangles`` (all edges,
    triangles by barrier) or ``none`` (complete graph plus every candidate triangle); ``filtration_backend``:
    ``auto``/``gudhi``/``exact`` (``complex.filtration``). ``triangle_sampling``: ``stratified`` (candidates from
    every level of the filtration, ``triangle_cap`` shared across ``num_thresholds`` levels) or ``median`` (the
    paper's cliques of edges at or below the ``triangle_quantile`` of the barriers). ``triplet_value``: ``raw``
    ``b_ijk`` or ``excess`` ``b_ijk - max(b_ij, b_ik, b_jk)``. ``dropped``: ``prune`` (delete router rows) or
    ``redirect`` (keep rows, remap to the harmonic-weighted nearest survivor). ``orientation``: how the unsigned
    barrier is oriented before the decomposition (``orientation.ORIENTATIONS``; ``frequency`` default, ``index`` the
    paper's ``i < j``). ``saliency_scale``: ``normalised`` divides the saliency term of the objective by the best
    ``k``-expert saliency sum, so all three terms lie in [0, 1] and ``lambda = 1`` weighs coverage like saliency;
    ``raw`` sums min-max saliencies (up to ``k``). ``relabelings``: random renumberings in the spread diagnostic. ``hc-smoe`` always binds each group
    member's router slot to the merged expert, as its authors do.
    """

    triangle_cap: int = 500
    triangle_sampling: str = "stratified"
    triangle_quantile: float = 0.5
    triplet_value: str = "raw"
    filtration: str = "joint"
    num_thresholds: int = 80
    filtration_backend: str = "auto"
    edge_fraction: float = 0.1  # p [assumed]
    triangle_fraction: float = 0.1  # q_T [assumed]
    lambda_edge: float = 1.0  # [assumed]
    lambda_triangle: float = 1.0  # [assumed]
    saliency: str = "reap"  # [assumed]
    saliency_scale: str = "normalised"
    orientation: str = "frequency"
    relabelings: int = 10
    dropped: str = "prune"
    alpha: float = 1.0  # [assumed]
    solver: str = "auto"
    seed: int = 0
    barrier: BarrierConfig = field(default_factory=BarrierConfig)

    def __post_init__(self) -> None:
        checks = {
            "triplet_value": (self.triplet_value, TRIPLET_VALUES),
            "filtration": (self.filtration, (*FILTRATION_MODES, "none")),
            "saliency": (self.saliency, SALIENCIES),
            "dropped": (self.dropped, DROPPED),
            "solver": (self.solver, SOLVERS),
            "triangle_sampling": (self.triangle_sampling, TRIANGLE_SAMPLINGS),
            "saliency_scale": (self.saliency_scale, SALIENCY_SCALES),
            "orientation": (self.orientation, ORIENTATIONS),
            "filtration_backend": (self.filtration_backend, BACKENDS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("edge_fraction", "triangle_fraction", "triangle_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.relabelings < 0:
            raise ConfigError(f"relabelings must be >= 0 (0 turns the relabeling diagnostic off), got {self.relabelings}")
        if self.triangle_cap < 0 or self.num_thresholds < 2 or min(self.lambda_edge, self.lambda_triangle, self.alpha) < 0:
            raise ConfigError("need triangle_cap >= 0, num_thresholds >= 2 and lambda_edge, lambda_triangle, alpha >= 0")
        if isinstance(self.barrier, dict):
            self.barrier = BarrierConfig(**self.barrier)


@dataclass
class LayerAnalysis:
    """Everything HodgeCover computes for one MoE layer (cached across ratios and methods)."""

    layer: int
    num_experts: int
    top_k: int
    pairs: list[tuple[int, int]]
    pair_barriers: np.ndarray
    triangles: list[tuple[int, int, int]]
    triangle_barriers: np.ndarray
    triangle_values: np.ndarray
    curve: Filtration | None
    complex: SimplicialComplex
    parts: HodgeDecomposition
    stats: LayerStats
    signs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [|E| of complex] orientation of each edge

    def edge_components(self) -> dict[str, np.ndarray]:
        return {"gradient": self.parts.gradient, "curl": self.parts.curl, "harmonic": self.parts.harmonic}

    def saliency(self, kind: str) -> np.ndarray:
        if kind == "none":
            return np.zeros(self.num_experts)
        return minmax(self.stats.reap if kind == "reap" else self.stats.frequencies)

    def pair_dict(self) -> dict[tuple[int, int], float]:
        return {p: float(v) for p, v in zip(self.pairs, self.pair_barriers)}


def analyze_layer(engine: BarrierEngine, layer: int, config: HodgeCoverConfig) -> LayerAnalysis:
    """Pair barriers, candidate triangles and their barriers, the filtration, ``K_tau*`` and its Hodge parts."""
    moe = engine.by_index[layer]
    pairs, pb = engine.pair_barriers(layer)
    levels = config.num_thresholds if config.triangle_sampling == "stratified" else None
    tris = candidate_triangles(pairs, pb, cap=config.triangle_cap, seed=config.seed,
                               quantile=config.triangle_quantile, levels=levels)
    tb = engine.triplet_barriers(layer, tris) if tris else np.zeros(0)
    return build_analysis(layer, moe.num_experts, moe.top_k, pairs, pb, tris, tb, engine.stats[layer], config)


def build_analysis(
    layer: int, num_experts: int, top_k: int, pairs: list[tuple[int, int]], pair_barriers: np.ndarray,
    triangles: list[tuple[int, int, int]], triangle_barriers: np.ndarray, stats: LayerStats,
    config: HodgeCoverConfig, *, warn: bool = True,
) -> LayerAnalysis:
    """The filtration, ``K_tau*`` and the Hodge parts of the oriented barrier from barriers already computed."""
    pb, tris, tb = np.asarray(pair_barriers, dtype=np.float64), list(triangles), np.asarray(triangle_barriers)
    lookup = dict(zip(pairs, pb))
    if config.triplet_value == "excess":
        tv = np.array([b - max(lookup[(i, j)], lookup[(i, k)], lookup[(j, k)]) for (i, j, k), b in zip(tris, tb)])
    else:
        tv = tb.astype(np.float64).copy()
    curve = None
    if config.filtration == "none" or (config.filtration == "triangles" and not tris):
        # without candidate triangles every threshold of the triangle filtration gives the complete graph
        cx = SimplicialComplex(num_experts, pairs, tris)
    else:
        curve = beta_curve(num_experts, pairs, pb, tris, tv, num_thresholds=config.num_thresholds,
                           mode=config.filtration, backend=config.filtration_backend)  # type: ignore[arg-type]
        if warn and config.filtration == "joint" and curve.best_index == len(curve.thresholds) - 1:
            warnings.warn(
                f"layer {layer}: tau* is the last threshold (beta_1 still rising, {len(tris)} candidate triangles "
                f"for {len(pairs)} edges), so the filtration selects the complete complex, as filtration='none' "
                "would; raise triangle_cap or read the Hodge parts as those of the full complex", UserWarning,
                stacklevel=3,
            )
        cx = filtration_complex(num_experts, pairs, pb, tris, tv, curve.best_threshold,
                                mode=config.filtration)  # type: ignore[arg-type]
    signs = edge_orientation(cx.edges, config.orientation, stats.frequencies.double().numpy(),
                             stats.reap.double().numpy())
    signal = {e: lookup[e] * s for e, s in zip(cx.edges, signs)}
    parts = decompose(cx, signal, solver=config.solver)  # type: ignore[arg-type]
    return LayerAnalysis(layer, num_experts, top_k, pairs, pb, tris, tb, tv, curve, cx, parts, stats, signs)


def _hc_smoe_groups(stats: LayerStats, keep: int) -> list[list[int]]:
    """Average-linkage clustering of the experts' mean outputs into ``keep`` groups (HC-SMoE-style)."""
    z = linkage(stats.mean_output.double().numpy(), method="average", metric="euclidean")
    labels = fcluster(z, t=keep, criterion="maxclust")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    out = sorted(groups.values())
    while len(out) < keep:  # ties can merge more than asked; split the largest group
        out.sort(key=len)
        big = out.pop()
        out += [big[:1], big[1:]]
    return sorted(out)


@dataclass
class Plan:
    """Survivors per MoE layer for one method and ratio; ``groups`` for merging methods, ``redirect`` if used."""

    method: str
    ratio: float
    keep: dict[int, list[int]]
    groups: dict[int, list[list[int]]] | None = None
    redirect: dict[int, torch.Tensor] | None = None
    retained: dict[int, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "ratio": self.ratio, "keep": self.keep, "retained": self.retained}


def select_layer(
    analysis: LayerAnalysis, method: str, keep: int, config: HodgeCoverConfig, *, generator: np.random.Generator
) -> list[int]:
    """Survivors of one layer for ``method`` (not ``hc-smoe``, which merges; see ``plan``)."""
    n = analysis.num_experts
    if method == "random":
        return sorted(int(i) for i in generator.choice(n, size=keep, replace=False))
    if method in ("reap", "frequency"):
        score = analysis.saliency(method)
        return sorted(int(i) for i in np.argsort(-score, kind="stable")[:keep])
    sal = analysis.saliency(config.saliency)
    best = float(np.sort(sal)[::-1][:keep].sum())
    if config.saliency_scale == "normalised" and best > 0:
        sal = sal / best  # the saliency term of Phi now lies in [0, 1], like the coverage fractions
    if method == "greedy-barrier":  # no topology: critical edges by raw barrier on all pairs, no triangles
        e_star = critical_edges(analysis.pairs, analysis.pair_barriers, config.edge_fraction)
        return greedy_cover(n, keep, sal, e_star, (), lambda_edge=config.lambda_edge, lambda_triangle=0.0)
    e_star = critical_edges(analysis.complex.edges, analysis.parts.harmonic, config.edge_fraction)
    if method == "no-triangle":
        return greedy_cover(n, keep, sal, e_star, (), lambda_edge=config.lambda_edge, lambda_triangle=0.0)
    if method == "hodgecover":
        t_star = critical_triangles(analysis.triangles, analysis.triangle_values, config.triangle_fraction)
        return greedy_cover(n, keep, sal, e_star, t_star, lambda_edge=config.lambda_edge,
                            lambda_triangle=config.lambda_triangle)
    raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")


def plan(
    analyses: dict[int, LayerAnalysis],
    method: str,
    ratio: float,
    config: HodgeCoverConfig,
) -> Plan:
    """Survivors per layer (uniform budget ``E - round(ratio E)``) and the Hodge mass each layer retains."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")
    rng = np.random.default_rng(config.seed)
    out = Plan(method, ratio, {})
    for layer, a in analyses.items():
        k = experts_to_keep(a.num_experts, ratio, a.top_k)
        if method == "hc-smoe":
            groups = _hc_smoe_groups(a.stats, k)
            out.groups = out.groups or {}
            out.groups[layer] = groups
            freq = a.stats.frequencies
            reps = [max(g, key=lambda i: (float(freq[i]), -i)) for g in groups]
            out.keep[layer] = sorted(reps)
            out.redirect = out.redirect or {}
            out.redirect[layer] = redirect_of_groups(a.num_experts, groups, reps)  # HC-SMoE binds member slots
        else:
            out.keep[layer] = select_layer(a, method, k, config, generator=rng)
        out.retained[layer] = retained_mass(out.keep[layer], a.complex.edges, a.edge_components(), a.triangles,
                                            a.triangle_barriers)
        if config.dropped == "redirect" and method != "hc-smoe":
            harmonic = dict(zip(a.complex.edges, a.parts.harmonic.tolist()))
            out.redirect = out.redirect or {}
            out.redirect[layer] = redirect_map(a.num_experts, out.keep[layer], a.pair_dict(), harmonic,
                                               alpha=config.alpha)
    return out


def apply_plan(model: nn.Module, chosen: Plan, analyses: dict[int, LayerAnalysis]) -> nn.Module:
    """Edit ``model`` in place: merge groups (``hc-smoe``, every member's router slot bound to its merged expert),
    redirect, or prune."""
    if chosen.groups is not None:
        return merge_groups(model, chosen.groups, {k: a.stats.frequencies for k, a in analyses.items()})
    if chosen.redirect is not None:
        return apply_redirect(model, chosen.keep, chosen.redirect)
    return prune_experts(model, chosen.keep)


def analyze(model: nn.Module, tokens: torch.Tensor, config: HodgeCoverConfig, *, cache_path: Any = None
            ) -> tuple[BarrierEngine, dict[int, LayerAnalysis]]:
    """A ``BarrierEngine`` on ``tokens`` and the analysis of every MoE layer."""
    engine = BarrierEngine(model, tokens, config.barrier, cache_path=cache_path)
    return engine, {m.index: analyze_layer(engine, m.index, config) for m in engine.moe_layers}


__all__ = [
    "DROPPED",
    "METHODS",
    "SALIENCIES",
    "SALIENCY_SCALES",
    "TRIANGLE_SAMPLINGS",
    "TRIPLET_VALUES",
    "HodgeCoverConfig",
    "LayerAnalysis",
    "Plan",
    "analyze",
    "analyze_layer",
    "build_analysis",
    "apply_plan",
    "plan",
    "select_layer",
]
