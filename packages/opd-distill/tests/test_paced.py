"""PACED weights and pass-rate estimation against closed forms."""

from __future__ import annotations

import pytest
import torch
from opd_distill import PacedConfig, estimate_pass_rates, hard_filter_weight, normalize_weights, paced_weight

from klcore.errors import ConfigError, DataError, ShapeError


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (2.0, 1.0), (0.5, 3.0), (3.0, 0.7)])
def test_weight_peaks_at_alpha_over_alpha_plus_beta(alpha, beta):
    grid = torch.linspace(0, 1, 4001)
    w = paced_weight(grid, alpha, beta)
    assert grid[w.argmax()].item() == pytest.approx(alpha / (alpha + beta), abs=1e-3)
    assert w[0].item() == 0.0 and w[-1].item() == 0.0
    closed = (alpha / (alpha + beta)) ** alpha * (beta / (alpha + beta)) ** beta
    assert w.max().item() == pytest.approx(closed, rel=1e-4)


def test_default_weight_values_at_k_8():
    p = torch.arange(9) / 8
    expected = torch.tensor([k * (8 - k) / 64 for k in range(9)])
    torch.testing.assert_close(paced_weight(p), expected)
    assert paced_weight(0.5).item() == 0.25
    torch.testing.assert_close(paced_weight(p), paced_weight(1 - p))  # symmetric about 1/2 at alpha = beta


def test_hard_filter_and_normalisation():
    p = torch.tensor([0.0, 0.125, 0.5, 1.0])
    torch.testing.assert_close(hard_filter_weight(p), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    w = paced_weight(p)
    n = normalize_weights(w)
    assert n.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(n / n[2], w / w[2])
    torch.testing.assert_close(normalize_weights(torch.zeros(3)), torch.zeros(3))
    raw = PacedConfig(weighting="paced", normalize=False).weights(p)
    torch.testing.assert_close(raw, w)
    torch.testing.assert_close(
        PacedConfig(weighting="hard_filter", normalize=True).weights(p), torch.tensor([0.0, 2, 2, 0])
    )
    torch.testing.assert_close(PacedConfig().weights(p), torch.ones(4))


def test_pass_rate_estimation():
    correct = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0], [1] * 8, [0] * 8])
    torch.testing.assert_close(estimate_pass_rates(correct), torch.tensor([3 / 8, 1.0, 0.0]))
    with pytest.raises(ShapeError):
        estimate_pass_rates(torch.zeros(3, 0))
    with pytest.raises(DataError):
        estimate_pass_rates(torch.full((2, 2), 0.5))


def test_re_estimation_schedule():
    cfg = PacedConfig(weighting="paced", every=5)
    assert [s for s in range(12) if cfg.due(s)] == [0, 5, 10]
    assert [s for s in range(12) if PacedConfig(weighting="paced").due(s)] == [0]
    assert not any(PacedConfig(weighting="none", every=1).due(s) for s in range(3))


def test_bad_values_raise():
    with pytest.raises(ConfigError, match="alpha"):
        paced_weight(0.5, alpha=-1.0)
    with pytest.raises(ConfigError, match="beta"):
        PacedConfig(beta=-0.5)
    with pytest.raises(ConfigError, match="samples"):
        PacedConfig(samples=0)
    with pytest.raises(ConfigError):
        PacedConfig(weighting="soft")
    with pytest.raises(DataError):
        paced_weight(torch.tensor([1.5]))


def test_non_numeric_inputs_raise_data_error():
    with pytest.raises(DataError, match="pass rates"):
        paced_weight("half")
    with pytest.raises(DataError, match="pass rates"):
        hard_filter_weight([0.5, None])
    with pytest.raises(DataError, match="correct"):
        estimate_pass_rates([[1, 0], [1]])
    with pytest.raises(DataError, match="correct"):
        estimate_pass_rates([["yes", "no"]])
