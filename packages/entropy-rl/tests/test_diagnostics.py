"""The paper's diagnostics against loops written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from entropy_rl import (
    covariance_entropy_agreement,
    sequence_mean_entropy,
    top_covariance_means,
    top_positive_share,
)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(6, 50, generator=g)
    mask = torch.rand(6, 50, generator=g) < 0.7
    mask[2] = False  # a response with no valid token
    return values, mask


def test_sequence_mean_entropy_by_loops() -> None:
    ent, mask = _data()
    ent = ent.abs()
    per = [
        sum(float(ent[i, t]) for t in range(50) if mask[i, t]) / int(mask[i].sum()) for i in range(6) if mask[i].any()
    ]
    assert sequence_mean_entropy(ent, mask) == pytest.approx(sum(per) / len(per), rel=1e-6)
    # differs from the token mean when lengths differ
    assert sequence_mean_entropy(ent, mask) != pytest.approx(float(ent[mask].mean()), rel=1e-6)


def test_top_covariance_means_and_share_by_sorting() -> None:
    cov, mask = _data(1)
    values = sorted((float(cov[i, t]) for i in range(6) for t in range(50) if mask[i, t]), reverse=True)
    n = len(values)
    got = top_covariance_means(cov, mask, fractions=(2e-4, 0.02, 0.3))
    for f in (2e-4, 0.02, 0.3):
        k = max(1, int(f * n))
        assert got[f] == pytest.approx(sum(values[:k]) / k, rel=1e-6)
    assert got[2e-4] == pytest.approx(values[0])  # one token when f N < 1
    k = max(1, int(0.1 * n))
    positive = sum(v for v in values if v > 0)
    assert top_positive_share(cov, mask, 0.1) == pytest.approx(sum(max(v, 0) for v in values[:k]) / positive, rel=1e-6)
    assert top_positive_share(-cov.abs(), mask, 0.1) == 0.0


def test_covariance_entropy_agreement_by_hand() -> None:
    cov = np.array([0.3, 0.1, -0.2, 0.5, 0.2])
    dh = np.array([-0.2, -0.05, 0.1, -0.4, -0.1])
    corr, positive = covariance_entropy_agreement(cov, dh)
    x, y = cov - cov.mean(), -dh + dh.mean()
    assert corr == pytest.approx(float((x * y).sum() / math.sqrt((x**2).sum() * (y**2).sum())))
    assert positive == pytest.approx(0.8)
    corr, positive = covariance_entropy_agreement([0.1, 0.2], [0.0, 0.1])
    assert math.isnan(corr) and positive == 1.0
