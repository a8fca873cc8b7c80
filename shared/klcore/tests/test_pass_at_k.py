"""Unbiased pass@k against the binomial formula and an exhaustive enumeration of k-subsets."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from klcore.errors import ConfigError, KlcoreError, ShapeError
from klcore.rollout import pass_at_k


def test_matches_comb_formula_for_all_small_cases() -> None:
    checked = 0
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                got = pass_at_k(n, c, k)
                assert isinstance(got, float)
                assert got == pytest.approx(float(expected), rel=1e-12, abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 11))


def test_matches_random_subset_enumeration() -> None:
    """pass@k = P(a uniformly random k-subset of the n samples holds a correct one)."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = sum(any(samples[i] for i in s) for s in subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hits / len(subsets), rel=1e-12, abs=1e-12), (n, c, k)


def test_edge_cases() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c = 7 < k: every 8-subset holds a correct sample
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5, rel=1e-12)  # k = 1: fraction correct


def test_large_n_is_finite_and_accurate() -> None:
    n, c, k = 1000, 3, 100
    expected = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize(
    ("n", "c", "k", "error"),
    [
        (5, 2, 6, ShapeError),  # k > n
        (5, 2, 0, ShapeError),  # k < 1
        (5, 2, -1, ShapeError),
        (5, 6, 2, ShapeError),  # c > n
        (5, -1, 2, ShapeError),  # c < 0
        (0, 0, 1, ShapeError),  # no samples
        (5.0, 2, 2, ConfigError),  # non-int
        (5, 2.0, 2, ConfigError),
        (5, 2, 2.0, ConfigError),
        (5, 2, "2", ConfigError),
        (5, True, 2, ConfigError),  # bool is not a count
        (5, 2, None, ConfigError),
    ],
)
def test_bad_arguments(n, c, k, error) -> None:
    with pytest.raises(error) as info:
        pass_at_k(n, c, k)
    assert isinstance(info.value, KlcoreError)
