from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hodgecover.selection import (
    coverage_objective,
    critical_edges,
    critical_triangles,
    experts_to_keep,
    greedy_cover,
    redirect_map,
    retained_mass,
)

from klcore.errors import ConfigError, DataError, ShapeError


def random_instance(seed: int, n: int = 8):
    rng = np.random.default_rng(seed)
    sal = rng.uniform(0, 0.3, n)
    edges = [e for e in itertools.combinations(range(n), 2) if rng.random() < 0.3]
    tris = [t for t in itertools.combinations(range(n), 3) if rng.random() < 0.1]
    return sal, edges, tris, float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2))


@pytest.mark.parametrize("seed", range(6))
def test_objective_is_monotone_and_submodular_under_hit_semantics(seed):
    n = 7
    sal, edges, tris, le, lt = random_instance(seed, n)
    phi = lambda s: coverage_objective(s, sal, edges, tris, lambda_edge=le, lambda_triangle=lt)  # noqa: E731
    subsets = [set(c) for r in range(n + 1) for c in itertools.combinations(range(n), r)]
    for a in subsets:
        for v in range(n):
            if v in a:
                continue
            gain_a = phi(a | {v}) - phi(a)
            assert gain_a >= -1e-12  # monotone
            for w in range(n):  # B = A + {w} is a superset: its gain is no larger
                if w != v and w not in a:
                    b = a | {w}
                    assert phi(b | {v}) - phi(b) <= gain_a + 1e-12


def test_both_endpoints_semantics_would_not_be_submodular():
    # the reason for "hit": counting an edge only when both endpoints are kept is supermodular
    both = lambda s: sum(1 for e in [(0, 1)] if set(e) <= s)  # noqa: E731
    assert both({0, 1}) - both({0}) > both({1}) - both(set())


@pytest.mark.parametrize("seed", range(10))
def test_greedy_reaches_one_minus_one_over_e_of_brute_force(seed):
    n = 9
    sal, edges, tris, le, lt = random_instance(seed, n)
    for k in (2, 3, 4):
        chosen = greedy_cover(n, k, sal, edges, tris, lambda_edge=le, lambda_triangle=lt)
        assert len(chosen) == k == len(set(chosen))
        value = coverage_objective(chosen, sal, edges, tris, lambda_edge=le, lambda_triangle=lt)
        best = max(coverage_objective(c, sal, edges, tris, lambda_edge=le, lambda_triangle=lt)
                   for c in itertools.combinations(range(n), k))
        assert value >= (1 - 1 / math.e) * best - 1e-12
        assert value <= best + 1e-12


def test_greedy_with_saliency_only_keeps_the_most_salient():
    sal = [0.1, 0.9, 0.5, 0.7, 0.0]
    assert greedy_cover(5, 2, sal) == [1, 3]


def test_greedy_covers_a_star_centre_first():
    edges = [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert greedy_cover(5, 1, [0.0] * 5, edges) == [0]


def test_critical_sets_are_top_fractions():
    edges = [(0, 1), (0, 2), (1, 2), (2, 3)]
    assert critical_edges(edges, [0.1, -0.9, 0.3, 0.0], 0.5) == [(0, 2), (1, 2)]
    assert critical_edges(edges, [0.1, -0.9, 0.3, 0.0], 0.1) == [(0, 2)]  # rounds up
    tris = [(0, 1, 2), (1, 2, 3)]
    assert critical_triangles(tris, [0.2, 0.5], 0.5) == [(1, 2, 3)]


def test_budget_rounds_and_rejects_ratios_outside_the_open_interval():
    assert experts_to_keep(16, 0.33) == 11 and experts_to_keep(16, 0.66) == 5
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            experts_to_keep(16, bad)
    with pytest.raises(ConfigError):
        experts_to_keep(8, 0.9, top_k=2)
    for bad_ratio in ("0.5", None, True):
        with pytest.raises(ConfigError):
            experts_to_keep(16, bad_ratio)
    with pytest.raises(ConfigError):
        experts_to_keep(16.0, 0.5)


def test_redirect_picks_the_cheapest_survivor_with_the_harmonic_penalty():
    b = {e: 1.0 for e in itertools.combinations(range(4), 2)}
    b[(0, 2)], b[(0, 3)] = 0.5, 0.55
    r = redirect_map(4, [2, 3], b, alpha=0.0)
    assert r.tolist() == [0, 0, 0, 1]
    norm = math.sqrt(sum(v * v for v in b.values()))
    # a large harmonic value on (0, 2) makes 3 the cheaper target
    r = redirect_map(4, [2, 3], b, {(0, 2): norm}, alpha=1.0)
    assert r[0].item() == 1 and r.dtype == torch.long
    with pytest.raises(DataError):
        redirect_map(4, [2, 3], {(0, 1): 1.0})


def test_retained_mass_counts_simplices_inside_the_kept_set():
    edges = [(0, 1), (0, 2), (1, 2), (2, 3)]
    m = retained_mass([0, 1, 2], edges, {"harmonic": [1.0, 2.0, 0.0, 3.0]}, [(0, 1, 2), (1, 2, 3)], [1.0, 1.0])
    assert m == {"harmonic": pytest.approx(5 / 14), "triangle": pytest.approx(0.5)}
    with pytest.raises(ShapeError, match="harmonic"):
        retained_mass([0, 1], edges, {"harmonic": [1.0, 2.0]})
    with pytest.raises(ShapeError, match="triangle_barriers"):
        retained_mass([0, 1], edges, {"harmonic": [1.0] * 4}, [(0, 1, 2), (1, 2, 3)], [1.0])
