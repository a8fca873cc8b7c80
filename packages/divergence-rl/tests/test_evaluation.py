"""Pass@k: the estimator against brute-force enumeration of subsets; sampling-based evaluation."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from divergence_rl.evaluation import PassAtKMetric, check_ks, mean_pass_at_k, pass_at_ks

from klcore.errors import ConfigError
from klcore.toy import AdditionTask


def _brute_force(outcomes: list[bool], k: int) -> Fraction:
    """Fraction of the k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 4, 7])
def test_mean_pass_at_k_equals_enumeration_of_subsets(n: int) -> None:
    problems = [[i % 3 == 0 for i in range(n)], [False] * n, [True] * n, [i >= n - 2 for i in range(n)]]
    counts = [sum(p) for p in problems]
    for k in range(1, n + 1):
        want = sum(_brute_force(p, k) for p in problems) / len(problems)
        assert mean_pass_at_k(counts, n, k) == pytest.approx(float(want), abs=1e-12)
    assert mean_pass_at_k(counts, n, 1) == pytest.approx(sum(counts) / (n * len(problems)))


class _Always(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0


class _Never(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 0.0


class _FirstCharEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def test_pass_at_ks_on_a_tiny_model(tiny_model, tokenizer) -> None:
    assert pass_at_ks(tiny_model, tokenizer, _Always(digits=1), ks=(1, 4), problems=3, samples=4) == {1: 1.0, 4: 1.0}
    assert pass_at_ks(tiny_model, tokenizer, _Never(digits=1), ks=(1, 4), problems=3, samples=4) == {1: 0.0, 4: 0.0}
    mixed = pass_at_ks(tiny_model, tokenizer, _FirstCharEven(digits=1), ks=(1, 2, 8), problems=8, samples=8, seed=3)
    assert 0.0 < mixed[1] < 1.0 and mixed[1] <= mixed[2] <= mixed[8]


@pytest.mark.parametrize("ks, samples", [((0,), 4), ((5,), 4), ((), 4), ((1,), 0), ((True,), 4)])
def test_bad_ks(ks, samples) -> None:
    with pytest.raises(ConfigError):
        check_ks(ks, samples)
    with pytest.raises(ConfigError):
        PassAtKMetric(ks=ks, samples=samples)


def test_bad_metric_options() -> None:
    with pytest.raises(ConfigError):
        PassAtKMetric(every=-1)
    with pytest.raises(ConfigError):
        PassAtKMetric(ood_task="nope")
    with pytest.raises(ConfigError):
        mean_pass_at_k([], 4, 1)
