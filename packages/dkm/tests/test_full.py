from __future__ import annotations

import math

import dkm
import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

D = torch.float64


def _relu_nngp_numpy(x: np.ndarray, layers: int, sw2: float = 1.0, sb2: float = 0.1) -> np.ndarray:
    """Independent NNGP recursion (arccos order 1, He scaling) in numpy."""
    g = x @ x.T / x.shape[1]
    for _ in range(layers + 1):
        d = np.sqrt(np.outer(np.diag(g), np.diag(g)))
        c = np.clip(g / d, -1, 1)
        t = np.arccos(c)
        k = d / np.pi * (np.sin(t) + (np.pi - t) * c)
        np.fill_diagonal(k, np.diag(g))
        g = sw2 * k + sb2
    return g


def _objective(model: dkm.FullDKM, noise: float, y: torch.Tensor) -> torch.Tensor:
    lik = dkm.GaussianLikelihood(noise, learn_noise=False)
    return dkm.FullDKMObjective(model, lik).log_objective(y)[0]


def test_no_hidden_layer_equals_exact_gp_marginal_likelihood() -> None:
    x = torch.randn(12, 3, dtype=D)
    y = torch.randn(12, 2, dtype=D)
    with dkm.jitter(0.0):
        model = dkm.FullDKM(x, num_layers=0, kernel="sqexp")
        value = _objective(model, 0.3, y).item()
    xn = x.numpy()
    d2 = ((xn[:, None] - xn[None]) ** 2).sum(-1) / 3
    cov = np.exp(-d2 / 2) + 0.3 * np.eye(12)
    expected = sum(multivariate_normal(np.zeros(12), cov).logpdf(y[:, c].numpy()) for c in range(2))
    assert value == pytest.approx(expected, abs=1e-10)


def test_no_hidden_layer_equals_gpytorch_exact_mll() -> None:
    gpytorch = pytest.importorskip("gpytorch")
    x = torch.randn(20, 4, dtype=D)
    y = torch.randn(20, dtype=D)

    class GP(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            lik = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(x, y, lik)
            self.covar = gpytorch.kernels.RBFKernel()
            self.covar.lengthscale = math.sqrt(4.0)  # G0 = X X^T / N0: distances are scaled by 1/N0

        def forward(self, inp):  # type: ignore[no-untyped-def]
            return gpytorch.distributions.MultivariateNormal(torch.zeros(inp.shape[0], dtype=D), self.covar(inp))

    gp = GP().double()
    gp.likelihood.noise = 0.2
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    reference = mll(gp(x), y).item() * 20  # gpytorch divides by the number of points
    with dkm.jitter(0.0):
        value = _objective(dkm.FullDKM(x, num_layers=0, kernel="sqexp"), 0.2, y).item()
    assert value == pytest.approx(reference, rel=1e-7)  # gpytorch: softplus-transformed noise, round-off


def test_nngp_initialisation_zero_kl_and_nngp_marginal_likelihood() -> None:
    x = torch.randn(10, 3, dtype=D)
    y = torch.randn(10, dtype=D)
    with dkm.jitter(0.0):
        model = dkm.FullDKM(x, num_layers=2, kernel="relu", nu=[0.5, 2.0])
        total, _loglik, penalty = dkm.FullDKMObjective(model, dkm.GaussianLikelihood(0.1)).log_objective(y)
    assert abs(penalty.item()) < 1e-10
    cov = _relu_nngp_numpy(x.numpy(), 2) + 0.1 * np.eye(10)
    assert total.item() == pytest.approx(multivariate_normal(np.zeros(10), cov).logpdf(y.numpy()), abs=1e-8)
    # the gradient of the penalty is zero there: only the likelihood pulls the Grams
    penalty.backward()
    for layer in model.stack.layers:
        assert layer.v.grad.abs().max().item() < 1e-9


def _optimise(model: dkm.FullDKM, noise: float, y: torch.Tensor, steps: int = 200) -> None:
    params = [layer.v for layer in model.stack.layers]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -_objective(model, noise, y)
        loss.backward()
        return loss

    opt.step(closure)


def test_nu_to_infinity_recovers_the_nngp_gram() -> None:
    x = torch.randn(6, 3, dtype=D)
    y = torch.randn(6, dtype=D)
    with dkm.jitter(0.0):
        model = dkm.FullDKM(x, num_layers=1, kernel="relu", nu=1e5)
        with torch.no_grad():  # start away from the NNGP so that the test can fail
            model.stack.layers[0].v.add_(0.3 * torch.randn(6, 6, dtype=D).tril())
        _optimise(model, 0.1, y)
        g1 = model.stack.layers[0].chol_gram()
        g1 = g1 @ g1.T
    k1 = torch.as_tensor(_relu_nngp_numpy(x.numpy(), 0))
    assert (g1 - k1).norm().item() / k1.norm().item() < 1e-3


def test_nu_to_zero_fits_y_y_transpose() -> None:
    p, d, noise = 4, 12, 1e-3
    x = torch.randn(p, 8, dtype=D)  # N0 >= P: the prior K(G0) is full rank
    y = torch.randn(p, d, dtype=D)
    with dkm.jitter(0.0):
        model = dkm.FullDKM(x, num_layers=1, kernel="linear", nu=1e-7)
        _optimise(model, noise, y, steps=500)
        g1 = model.stack.layers[0].chol_gram()
        g1 = g1 @ g1.T
    target = y @ y.T / d - noise * torch.eye(p, dtype=D)  # top kernel linear: K(G1) + noise I = Y Y^T / D
    assert torch.allclose(g1, target, atol=2e-3)


def test_full_dkm_prediction_at_training_points_is_the_gp_posterior() -> None:
    x = torch.randn(8, 2, dtype=D)
    y = torch.randn(8, dtype=D)
    with dkm.jitter(0.0):
        model = dkm.FullDKM(x, num_layers=1, kernel="relu", nu=1.0)
        k, _ = model()
        mean, var = model.predict(x[:3], y, 0.2)
    kn = k.ii.detach() + 0.2 * torch.eye(8, dtype=D)
    expected_mean = k.ii[:3].detach() @ torch.linalg.solve(kn, y)
    expected_var = (
        k.ii.diagonal()[:3].detach() - (k.ii[:3].detach() @ torch.linalg.inv(kn) @ k.ii[:, :3].detach()).diagonal()
    )
    assert torch.allclose(mean[:, 0], expected_mean, atol=1e-10)
    assert torch.allclose(var, expected_var, atol=1e-10)


def test_full_objective_rejects_other_inputs_and_nan() -> None:
    from klcore.errors import DataError, NonFiniteError

    x = torch.randn(5, 2, dtype=D)
    objective = dkm.FullDKMObjective(dkm.FullDKM(x), dkm.GaussianLikelihood())
    with pytest.raises(DataError, match="training inputs"):
        objective(x + 1, torch.zeros(5, dtype=D))
    with pytest.raises(DataError):
        objective(x, torch.full((5,), float("nan"), dtype=D))
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        dkm.FullDKM(bad)
    with pytest.raises(DataError, match="NaN"):
        objective.model.predict(x[:2], torch.full((5,), float("nan"), dtype=D), 0.1)


def test_analytic_marginal_likelihood_gradient_matches_autograd() -> None:
    from dkm._marginal import gaussian_log_marginal

    a = torch.randn(7, 9, dtype=D)
    k = (a @ a.T / 9 + 0.2 * torch.eye(7, dtype=D)).requires_grad_(True)
    y = torch.randn(7, 3, dtype=D, requires_grad=True)
    gk, gy = torch.autograd.grad(gaussian_log_marginal(k, y), (k, y))
    ref = sum(torch.distributions.MultivariateNormal(torch.zeros(7, dtype=D), k).log_prob(y[:, c]) for c in range(3))
    rk, ry = torch.autograd.grad(ref, (k, y))
    assert torch.allclose(gk, 0.5 * (rk + rk.T), atol=1e-10)  # symmetric gradient for a symmetric K
    assert torch.allclose(gy, ry, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda m: gaussian_log_marginal(0.5 * (m + m.T), y.detach()), (k.detach().clone().requires_grad_(True),)
    )


def test_linear_one_layer_optimum_matches_the_riccati_closed_form() -> None:
    """Linear kernels, noiseless output: nu G K^-1 G + (D - nu) G = D S with S = Y Y^T / D (notes, section 8.4)."""
    p, d, nu = 4, 6, 2.0
    x = torch.randn(p, 8, dtype=D)
    y = torch.randn(p, d, dtype=D)
    with dkm.jitter(0.0):
        model = dkm.FullDKM(x, num_layers=1, kernel="linear", nu=nu)
        _optimise(model, 1e-9, y, steps=500)
        g1 = model.stack.layers[0].chol_gram()
        g1 = (g1 @ g1.T).detach()
    k = x @ x.T / 8
    evals, evecs = torch.linalg.eigh(k)
    k_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    k_inv_half = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    m, u = torch.linalg.eigh(k_inv_half @ (y @ y.T / d) @ k_inv_half)
    h = (-(d - nu) + torch.sqrt((d - nu) ** 2 + 4 * nu * d * m)) / (2 * nu)
    expected = k_half @ u @ torch.diag(h) @ u.T @ k_half
    assert torch.allclose(g1, expected, atol=1e-4 * expected.abs().max().item())
