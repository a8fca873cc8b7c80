from __future__ import annotations

import itertools

import numpy as np
import pytest
from hodgecover.structure import additive_fit_r2, triplet_pair_ratio


def test_additive_fit_is_one_for_per_expert_costs_and_matches_an_independent_fit():
    rng = np.random.default_rng(0)
    n = 7
    pairs = list(itertools.combinations(range(n), 2))
    u = rng.uniform(size=n)
    assert additive_fit_r2(n, pairs, [u[i] + u[j] for i, j in pairs]) == pytest.approx(1.0)
    b = rng.uniform(size=len(pairs))
    # independent: the projection onto span{e_i + e_j} through the normal equations
    m = np.array([[1.0 if v in p else 0.0 for v in range(n)] for p in pairs])
    fit = m @ np.linalg.solve(m.T @ m, m.T @ b)
    want = 1 - ((b - fit) ** 2).sum() / ((b - b.mean()) ** 2).sum()
    assert additive_fit_r2(n, pairs, b) == pytest.approx(want, rel=1e-10)
    assert additive_fit_r2(n, pairs, np.ones(len(pairs))) == 1.0


def test_triplet_ratio_is_the_median_of_triple_over_pair_sums():
    pairs = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
    values = [1.0, 2.0, 3.0, 1.0, 1.0]
    tris = [(0, 1, 2), (0, 1, 3)]
    assert triplet_pair_ratio(pairs, values, tris, [6.0, 1.5]) == pytest.approx((1.0 + 0.5) / 2)
    assert np.isnan(triplet_pair_ratio(pairs, values, [], []))
