"""hodgecover: Hodge decomposition of expert merge barriers and topology-aware MoE expert reduction.

``complex`` holds the simplicial algebra, ``barriers`` the merge barriers on a Hugging Face MoE model,
``selection`` the coverage objective, ``surgery`` the model edits, ``pipeline`` the method end to end.
"""

from __future__ import annotations

from hodgecover.barriers import BarrierCache, BarrierConfig, BarrierEngine, LayerStats, candidate_triangles
from hodgecover.calibration import perplexity, token_blocks
from hodgecover.complex import (
    Filtration,
    HodgeDecomposition,
    SimplicialComplex,
    decompose,
    filtration,
    filtration_complex,
    hodge_decomposition,
)
from hodgecover.export import MissingExtraError, to_pyg
from hodgecover.moe import MoELayer, decoder_of, find_moe_layers, merge_operator, merged
from hodgecover.pipeline import (
    METHODS,
    HodgeCoverConfig,
    LayerAnalysis,
    Plan,
    analyze,
    analyze_layer,
    apply_plan,
    plan,
    select_layer,
)
from hodgecover.redirect_checkpoint import load_redirected, save_redirected
from hodgecover.selection import (
    coverage_objective,
    critical_edges,
    critical_triangles,
    experts_to_keep,
    greedy_cover,
    minmax,
    redirect_map,
    retained_mass,
)
from hodgecover.surgery import RedirectRouter, apply_redirect, merge_groups, prune_experts, redirect_of_groups
from hodgecover.wanda import hybrid_sparsity, second_ratio, wanda_mask, wanda_prune

__all__ = [
    "METHODS",
    "BarrierCache",
    "BarrierConfig",
    "BarrierEngine",
    "Filtration",
    "HodgeCoverConfig",
    "HodgeDecomposition",
    "LayerAnalysis",
    "LayerStats",
    "MissingExtraError",
    "MoELayer",
    "Plan",
    "RedirectRouter",
    "SimplicialComplex",
    "analyze",
    "analyze_layer",
    "apply_plan",
    "apply_redirect",
    "candidate_triangles",
    "coverage_objective",
    "critical_edges",
    "critical_triangles",
    "decoder_of",
    "decompose",
    "experts_to_keep",
    "filtration",
    "filtration_complex",
    "find_moe_layers",
    "greedy_cover",
    "hybrid_sparsity",
    "load_redirected",
    "hodge_decomposition",
    "merge_groups",
    "merge_operator",
    "merged",
    "minmax",
    "perplexity",
    "plan",
    "prune_experts",
    "redirect_map",
    "redirect_of_groups",
    "retained_mass",
    "save_redirected",
    "second_ratio",
    "select_layer",
    "to_pyg",
    "token_blocks",
    "wanda_mask",
    "wanda_prune",
]
