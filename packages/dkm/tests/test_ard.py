"""Learned input scales (ARD in G0)."""

from __future__ import annotations

import dkm
import pytest
import torch
from dkm.gram import input_gram
from dkm.layers import _cholesky_parameter as _parameter

from klcore.errors import ShapeError

D = torch.float64


def test_ard_zero_layer_sqexp_equals_gpytorch_ard_rbf() -> None:
    gpytorch = pytest.importorskip("gpytorch")
    x, y = torch.randn(25, 3, dtype=D), torch.randn(25, dtype=D)
    with dkm.jitter(0.0):
        model = dkm.FullDKM(x, num_layers=0, kernel="sqexp", ard=True)
        with torch.no_grad():
            model.input_scales.log_scale.copy_(torch.tensor([0.3, -0.7, 1.1], dtype=D))
        lik = dkm.GaussianLikelihood(0.2, learn_noise=False)
        value = dkm.FullDKMObjective(model, lik).log_objective(y)[0].item()
    kernel = gpytorch.kernels.RBFKernel(ard_num_dims=3).double()
    kernel.lengthscale = 3**0.5 / model.input_scales().detach()  # G0 = X S^2 X^T / N0
    with torch.no_grad():
        cov = kernel(x).to_dense() + 0.2 * torch.eye(25, dtype=D)
    expected = torch.distributions.MultivariateNormal(torch.zeros(25, dtype=D), cov).log_prob(y).item()
    assert value == pytest.approx(expected, rel=1e-10)


def test_ard_learns_a_larger_scale_for_the_relevant_feature() -> None:
    x = torch.randn(60, 3, dtype=D)
    y = torch.sin(2 * x[:, 0]) + 0.05 * torch.randn(60, dtype=D)
    models = (dkm.FullDKM(x, num_layers=0, kernel="sqexp", ard=True), dkm.FullDKM(x, ard=True, whiten=True))
    for model in models:
        dkm.fit(dkm.FullDKMObjective(model, dkm.GaussianLikelihood()), x, y, epochs=40, optimizer="lbfgs")
        log_scale = model.input_scales.log_scale.detach()
        assert log_scale[0] > log_scale[1:].max() + 1.0
    # unwhitened, the scales have no first-order gradient at the NNGP start (dKL/dK = 0 at G = K)
    plain = dkm.FullDKM(x, ard=True)
    dkm.fit(dkm.FullDKMObjective(plain, dkm.GaussianLikelihood()), x, y, epochs=40, optimizer="lbfgs")
    assert plain.input_scales.log_scale.detach().abs().max() < 0.1


def test_whitened_layer_has_the_same_objective_for_the_same_gram() -> None:
    x, y = torch.randn(8, 2, dtype=D), torch.randn(8, dtype=D)
    plain, white = dkm.FullDKM(x, num_layers=1, nu=3.0), dkm.FullDKM(x, num_layers=1, nu=3.0, whiten=True)
    k1 = plain.stack.kernels[0](input_gram(x)).ii
    chol_k = torch.linalg.cholesky(k1)
    chol_g = torch.linalg.cholesky(k1 + 0.3 * torch.ones(8, 8, dtype=D))  # some G away from the prior
    with torch.no_grad():
        plain.stack.layers[0].v.copy_(_parameter(chol_g))
        white.stack.layers[0].v.copy_(_parameter(torch.linalg.solve_triangular(chol_k, chol_g, upper=False)))
    lik = dkm.GaussianLikelihood(0.2)
    a = dkm.FullDKMObjective(plain, lik).log_objective(y)
    b = dkm.FullDKMObjective(white, lik).log_objective(y)
    assert a[2].item() > 0.1
    for u, v in zip(a, b):
        assert u.item() == pytest.approx(v.item(), rel=1e-9)


def test_input_gram_scales_shape_is_checked() -> None:
    z = torch.randn(4, 3, dtype=D)
    scaled = input_gram(z, z, torch.tensor([2.0, 1.0, 1.0], dtype=D))
    assert torch.allclose(scaled.ii, (z * torch.tensor([2.0, 1, 1], dtype=D)) @ (z * torch.tensor([2.0, 1, 1])).T / 3)
    assert torch.allclose(scaled.t, scaled.ii.diagonal())
    with pytest.raises(ShapeError, match="one per input feature"):
        input_gram(z, scales=torch.ones(2, dtype=D))
