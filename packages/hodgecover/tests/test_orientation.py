from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hodgecover.barriers import LayerStats
from hodgecover.orientation import edge_orientation
from hodgecover.pipeline import HodgeCoverConfig, build_analysis, select_layer
from hodgecover.relabeling import harmonic_share, relabel, relabeling_spread
from hodgecover.selection import critical_edges, critical_triangles, greedy_cover

from klcore.errors import ConfigError


def _layer(n=8, seed=0, **options):
    """A layer's barriers and statistics without a model: random pair barriers, every triangle just above its
    largest edge, distinct routing frequencies and REAP saliencies."""
    rng = np.random.default_rng(seed)
    pairs = list(itertools.combinations(range(n), 2))
    pb = rng.exponential(size=len(pairs))
    look = dict(zip(pairs, pb))
    tris = list(itertools.combinations(range(n), 3))
    tb = np.array([max(look[(i, j)], look[(i, k)], look[(j, k)]) for i, j, k in tris]) + rng.uniform(0, 0.5, len(tris))
    stats = LayerStats(frequencies=torch.tensor(rng.dirichlet(np.ones(n)), dtype=torch.float32),
                       reap=torch.tensor(rng.uniform(size=n), dtype=torch.float32),
                       input_sq=torch.zeros(n, 4), hidden_sq=torch.zeros(n, 4), mean_output=torch.zeros(n, 4))
    config = HodgeCoverConfig(num_thresholds=20, **options)
    return build_analysis(0, n, 2, pairs, pb, tris, tb, stats, config, warn=False), config


def _abs_harmonic(a, perm=None):
    """|h| per unordered edge, in the original numbering."""
    back = np.argsort(perm) if perm is not None else None
    out = {}
    for (i, j), h in zip(a.complex.edges, a.parts.harmonic):
        key = (i, j) if back is None else tuple(sorted((int(back[i]), int(back[j]))))
        out[key] = abs(h)
    return out


def test_frequency_orientation_makes_the_analysis_and_selection_independent_of_numbering():
    a, config = _layer()
    want_h = _abs_harmonic(a)
    want = select_layer(a, "hodgecover", 4, config, generator=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for _ in range(6):
        perm = rng.permutation(8)
        b = relabel(a, perm, config)
        for name in ("total", "gradient", "curl", "harmonic"):
            assert b.parts.energies[name] == pytest.approx(a.parts.energies[name], rel=1e-9, abs=1e-12)
        got_h = _abs_harmonic(b, perm)
        assert got_h.keys() == want_h.keys()
        np.testing.assert_allclose([got_h[e] for e in want_h], list(want_h.values()), atol=1e-10)
        chosen = select_layer(b, "hodgecover", 4, config, generator=np.random.default_rng(0))
        assert sorted(int(np.flatnonzero(perm == s)[0]) for s in chosen) == want


def test_index_orientation_depends_on_numbering_and_the_spread_diagnostic_shows_it():
    a, config = _layer(orientation="index")
    shares = {round(harmonic_share(relabel(a, np.random.default_rng(s).permutation(8), config)), 9) for s in range(6)}
    assert len(shares) > 1  # the paper's i < j convention: the energy split moves with the numbering
    spread = relabeling_spread(a, config, 0.5, relabelings=6)
    assert spread["harmonic_share_max"] - spread["harmonic_share_min"] > 1e-3
    invariant, cfg = _layer()
    spread = relabeling_spread(invariant, cfg, 0.5, relabelings=6)
    assert spread["harmonic_share_max"] - spread["harmonic_share_min"] < 1e-9
    assert all(spread[f"{m}/distinct_sets"] == 1 for m in ("hodgecover", "no-triangle", "reap", "frequency"))
    with pytest.raises(ConfigError):
        relabeling_spread(a, config, 0.5, methods=("hc-smoe",))


def test_edge_orientation_points_from_the_less_to_the_more_used_expert():
    freq, sal = [0.5, 0.1, 0.1, 0.3], [0.0, 0.2, 0.9, 0.0]
    edges = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    np.testing.assert_array_equal(edge_orientation(edges, "frequency", freq, sal), [-1, -1, 1, 1, 1])
    np.testing.assert_array_equal(edge_orientation(edges, "saliency", freq, sal), [1, 1, 1, -1, -1])
    np.testing.assert_array_equal(edge_orientation(edges, "index", freq, sal), [1, 1, 1, 1, 1])
    with pytest.raises(ConfigError):
        edge_orientation(edges, "alphabetical", freq, sal)


def test_normalised_saliency_puts_the_objective_terms_on_one_scale():
    a, config = _layer(n=12, seed=3)
    raw = HodgeCoverConfig(num_thresholds=20, saliency_scale="raw")
    sal = a.saliency("reap")
    e_star = critical_edges(a.complex.edges, a.parts.harmonic, config.edge_fraction)
    t_star = critical_triangles(a.triangles, a.triangle_values, config.triangle_fraction)
    k = 4
    best = np.sort(sal)[::-1][:k].sum()
    rng = np.random.default_rng(0)
    assert select_layer(a, "hodgecover", k, config, generator=rng) == greedy_cover(12, k, sal / best, e_star, t_star)
    assert select_layer(a, "hodgecover", k, raw, generator=rng) == greedy_cover(12, k, sal, e_star, t_star)
    # raw: saliency sums up to k against coverage fractions <= 1; normalised: every term in [0, 1]
    assert select_layer(a, "hodgecover", k, raw, generator=rng) != select_layer(a, "hodgecover", k, config,
                                                                                generator=rng)
