"""Group advantages (GRPO, Dr. GRPO, RLOO) against explicit per-group loops."""

from __future__ import annotations

import math

import pytest
import torch

from klcore.advantages import ESTIMATORS, by_name, dr_grpo, grpo, rloo
from klcore.errors import ConfigError, DTypeError, NonFiniteError, ShapeError


def ref_grpo(rewards: torch.Tensor, scale: bool, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        row = [float(v) for v in rewards[i]]
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (g - 1)) if g > 1 else 0.0  # unbiased
        for j, v in enumerate(row):
            out[i, j] = (v - mean) / (std + eps) if scale and g > 1 else v - mean
    return out


def ref_rloo(rewards: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        row = [float(v) for v in rewards[i]]
        for j, v in enumerate(row):
            others = row[:j] + row[j + 1 :]
            out[i, j] = v - sum(others) / len(others)
    return out


@pytest.mark.parametrize("group", [2, 3, 4, 8])
@pytest.mark.parametrize("scale", [True, False])
def test_grpo_matches_loops(group: int, scale: bool) -> None:
    rewards = torch.randn(5, group) * 2 + 1
    out = grpo(rewards, scale=scale)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    torch.testing.assert_close(out.double(), ref_grpo(rewards, scale), rtol=1e-5, atol=1e-5)


def test_grpo_uses_unbiased_std_and_eps() -> None:
    rewards = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    out = grpo(rewards)
    # group [0, 1]: mean 0.5, unbiased std sqrt(0.5) (the biased one would be 0.5)
    expected0 = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(out[0], torch.tensor([-expected0, expected0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1:], torch.zeros(2, 2), rtol=0, atol=0)  # constant groups: 0, not NaN
    custom = grpo(torch.tensor([[0.0, 2.0]]), eps=1.0)
    torch.testing.assert_close(custom, torch.tensor([[-1.0, 1.0]]) / (math.sqrt(2.0) + 1.0), rtol=1e-6, atol=1e-7)


def test_binary_rewards_and_integer_input() -> None:
    rewards = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 1]])
    for scale in (True, False):
        out = grpo(rewards, scale=scale)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref_grpo(rewards, scale), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rloo(rewards).double(), ref_rloo(rewards), rtol=1e-5, atol=1e-6)


def test_group_of_one_gives_zeros() -> None:
    rewards = torch.tensor([[3.0], [-1.5], [0.0]])
    for scale in (True, False):
        torch.testing.assert_close(grpo(rewards, scale=scale), torch.zeros(3, 1), rtol=0, atol=0)
    torch.testing.assert_close(dr_grpo(rewards), torch.zeros(3, 1), rtol=0, atol=0)


def test_dr_grpo_is_grpo_without_scale() -> None:
    rewards = torch.randn(4, 6) * 3
    torch.testing.assert_close(dr_grpo(rewards), grpo(rewards, scale=False), rtol=0, atol=0)
    torch.testing.assert_close(dr_grpo(rewards).double(), ref_grpo(rewards, scale=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [2, 3, 5, 8])
def test_rloo_matches_leave_one_out_loops(group: int) -> None:
    rewards = torch.randn(4, group) * 2
    out = rloo(rewards)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_rloo(rewards), rtol=1e-5, atol=1e-5)


def test_advantages_sum_to_zero_per_group() -> None:
    rewards = torch.randn(3, 7)
    for fn in (grpo, dr_grpo, rloo):
        torch.testing.assert_close(fn(rewards).sum(-1), torch.zeros(3), rtol=0, atol=1e-5)


def test_by_name() -> None:
    assert by_name("grpo") is grpo
    assert by_name("dr_grpo") is dr_grpo
    assert by_name("rloo") is rloo
    assert set(ESTIMATORS) == {"grpo", "dr_grpo", "rloo"}
    for bad in ("ppo", "GRPO", "", "dr-grpo"):
        with pytest.raises(ConfigError):
            by_name(bad)


@pytest.mark.parametrize("fn", [grpo, dr_grpo, rloo])
def test_bad_rewards(fn) -> None:
    with pytest.raises(ShapeError):
        fn(torch.randn(6))
    with pytest.raises(ShapeError):
        fn(torch.randn(2, 3, 4))
    with pytest.raises(ShapeError):
        fn(torch.randn(0, 4))
    with pytest.raises(ShapeError):
        fn(torch.randn(3, 0))
    with pytest.raises(DTypeError):
        fn([[1.0, 2.0]])
    for bad in (float("nan"), float("inf"), float("-inf")):
        r = torch.randn(3, 4)
        r[2, 1] = bad
        with pytest.raises(NonFiniteError):
            fn(r)


def test_rloo_needs_two_samples() -> None:
    with pytest.raises(ShapeError):
        rloo(torch.randn(4, 1))
