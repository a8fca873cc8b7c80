from __future__ import annotations

import math

import dkm
import pytest
import torch
from dkm.gram import GramBlocks
from dkm.kernels import make_kernel

from klcore.errors import NotPSDError

D = torch.float64


def test_arccos_matches_published_value_and_monte_carlo() -> None:
    g = torch.tensor([[1.3, 0.4], [0.4, 0.7]], dtype=D)
    k = dkm.arccos_kernel(g, g.diagonal(), g.diagonal())
    assert k[0, 1].item() == pytest.approx(0.53075618, abs=1e-8)
    # Monte Carlo: 2 E[relu(u) relu(v)], (u, v) ~ N(0, G); and K_aa = 2 E[relu(u)^2] = G_aa
    gen = torch.Generator().manual_seed(1)
    uv = torch.randn(2_000_000, 2, generator=gen, dtype=D) @ torch.linalg.cholesky(g).T
    r = torch.relu(uv)
    mc = 2 * (r[:, :, None] * r[:, None, :]).mean(0)
    assert torch.allclose(k, mc, atol=4e-3)
    assert torch.allclose(k.diagonal(), g.diagonal(), rtol=1e-9)


def test_arccos_kernel_monte_carlo_random_gram() -> None:
    x = torch.randn(4, 6, dtype=D)
    g = x @ x.T / 6
    k = dkm.arccos_kernel(g, g.diagonal(), g.diagonal())
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(1_000_000, 4, generator=gen, dtype=D) @ torch.linalg.cholesky(g).T
    r = torch.relu(f)
    mc = 2 * r.T @ r / r.shape[0]
    assert torch.allclose(k, mc, atol=5e-3 * g.diagonal().max().item())


def test_relu_kernel_blocks_agree_with_full_matrix_and_scale() -> None:
    x = torch.randn(7, 3, dtype=D)
    kernel = dkm.ReluKernel(sigma_w2=2.0, sigma_b2=0.3)
    with dkm.jitter(0.0):
        full = kernel(dkm.input_gram(x)).ii
        blocks = kernel(dkm.input_gram(x[:4], x[4:]))
    g = x @ x.T / 3
    expected = 2.0 * dkm.arccos_kernel(g, g.diagonal(), g.diagonal()) + 0.3
    assert torch.allclose(full, expected, atol=1e-12)
    assert torch.allclose(blocks.ii, full[:4, :4], atol=1e-12)
    assert torch.allclose(blocks.ti, full[4:, :4], atol=1e-12)
    assert torch.allclose(blocks.t, full.diagonal()[4:], atol=1e-12)


def test_sqexp_closed_form() -> None:
    g = torch.tensor([[1.3, 0.4], [0.4, 0.7]], dtype=D)
    with dkm.jitter(0.0):
        k = dkm.SqExpKernel()(GramBlocks(g)).ii
    assert k[0, 1].item() == pytest.approx(math.exp(-0.6), abs=1e-12)
    x = torch.randn(5, 4, dtype=D)
    kernel = dkm.SqExpKernel(lengthscale=0.7, outputscale=1.5)
    with dkm.jitter(0.0):
        blocks = kernel(dkm.input_gram(x[:3], x[3:]))
    d2 = torch.cdist(x[3:], x[:3]).square() / 4
    assert torch.allclose(blocks.ti, 1.5 * torch.exp(-d2 / (2 * 0.49)), atol=1e-12)
    assert torch.allclose(blocks.t, torch.full((2,), 1.5, dtype=D))


def test_normalized_gaussian_closed_form() -> None:
    g = torch.tensor([[1.3, 0.4], [0.4, 0.7]], dtype=D)
    with dkm.jitter(0.0):
        k = dkm.NormalizedGaussianKernel(sigma_w2=1.0, sigma_b2=0.1)(GramBlocks(g)).ii
    s = math.sqrt(1.3 * 0.7)
    assert k[0, 1].item() == pytest.approx(s * math.exp(0.4 / s - 1) + 0.1, abs=1e-12)
    assert k[0, 0].item() == pytest.approx(1.3 + 0.1, abs=1e-12)


def test_jitter_on_diagonals_and_duplicate_points_have_finite_gradients() -> None:
    x = torch.randn(3, 2, dtype=D)
    x = torch.cat([x, x[:1]])  # a duplicated point: cos = 1 in the arccos kernel
    kernel = dkm.ReluKernel()
    g = dkm.input_gram(x)
    g.ii.requires_grad_(True)
    k = kernel(g).ii
    eps = dkm.get_jitter()
    raw = kernel.log_sigma_w2.exp() * g.ii.diagonal() + kernel.log_sigma_b2.exp()
    assert torch.allclose(k.diagonal(), raw * (1 + eps) + eps)
    k.sum().backward()
    assert torch.isfinite(g.ii.grad).all()


def test_unknown_kernel_and_bad_hyperparameters_raise() -> None:
    from klcore.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown kernel"):
        dkm.make_kernel("matern")
    with pytest.raises(ConfigError):
        dkm.ReluKernel(sigma_w2=-1.0)
    with pytest.raises(ConfigError), dkm.jitter(-1.0):
        pass


def test_arccos_kernel_rejects_mismatched_diagonals() -> None:
    from klcore.errors import ShapeError

    g = torch.eye(3, dtype=D)
    with pytest.raises(ShapeError, match="diag_a"):
        dkm.arccos_kernel(g, torch.ones(2, dtype=D), torch.ones(3, dtype=D))


@pytest.mark.parametrize("kernel", ["relu", "sqexp", "normalized-gaussian", "linear"])
def test_kernels_refuse_a_gram_with_a_negative_diagonal(kernel: str) -> None:
    bad = torch.tensor([[-0.9, 0.1], [0.1, 1.0]], dtype=D)
    with pytest.raises(NotPSDError, match="negative diagonal"):
        make_kernel(kernel)(GramBlocks(bad))
    good = torch.eye(2, dtype=D)
    with pytest.raises(NotPSDError, match="test diagonal"):
        make_kernel(kernel)(GramBlocks(good, torch.zeros(1, 2, dtype=D), torch.tensor([-0.5], dtype=D)))
