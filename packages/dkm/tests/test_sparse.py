from __future__ import annotations

import dkm
import numpy as np
import pytest
import torch
from dkm.gram import GramBlocks

from klcore.errors import DataError, DTypeError, NonFiniteError, NotPSDError, ShapeError

D = torch.float64


def _perturbed_layer(k_ii: torch.Tensor, name: str = "layer 1") -> dkm.GramLayer:
    layer = dkm.GramLayer(k_ii.shape[0], 1.0, name=name)
    layer.initialise(k_ii)
    with torch.no_grad():
        layer.v.add_(0.3 * torch.randn_like(layer.v).tril())
    return layer


def test_conditional_with_test_points_equal_to_inducing_points_reproduces_g_ii() -> None:
    z = torch.randn(6, 8, dtype=D)
    with dkm.jitter(0.0):
        k = dkm.ReluKernel()(dkm.input_gram(z, z))
    layer = _perturbed_layer(k.ii)
    g, _ = layer(k)
    assert torch.allclose(g.ti, g.ii, atol=1e-10)
    assert torch.allclose(g.t, g.ii.diagonal(), atol=1e-10)


def test_conditional_blocks_match_sampled_features() -> None:
    """Sample features f_i ~ N(0, G_ii), f_t | f_i from the prior conditional; compare second moments."""
    z, x = torch.randn(4, 6, dtype=D), torch.randn(3, 6, dtype=D)
    with dkm.jitter(0.0):
        k = dkm.ReluKernel()(dkm.input_gram(torch.cat([z, x]), None))
        blocks = dkm.ReluKernel()(dkm.input_gram(z, x))
    layer = _perturbed_layer(blocks.ii)
    g, _ = layer(blocks)
    k_ii, k_ti, k_tt = k.ii[:4, :4], k.ii[4:, :4], k.ii[4:, 4:]
    chol_g = layer.chol_gram().detach()
    gen = torch.Generator().manual_seed(3)
    n = 400_000
    f_i = chol_g @ torch.randn(4, n, generator=gen, dtype=D)
    b = k_ti @ torch.linalg.inv(k_ii)
    schur = k_tt - b @ k_ti.T
    f_t = b @ f_i + torch.linalg.cholesky(schur) @ torch.randn(3, n, generator=gen, dtype=D)
    assert torch.allclose(g.ti.detach(), f_t @ f_i.T / n, atol=0.02)
    assert torch.allclose(g.t.detach(), (f_t * f_t).mean(1), atol=0.02)


def test_sparse_with_all_training_points_as_inducing_matches_full_dkm() -> None:
    x = torch.randn(9, 10, dtype=D)
    y = torch.randn(9, 2, dtype=D)
    noise = 0.15
    with dkm.jitter(0.0):
        full = dkm.FullDKM(x, num_layers=2, kernel="relu", nu=[0.7, 3.0])
        with torch.no_grad():
            for layer in full.stack.layers:
                layer.v.add_(0.2 * torch.randn_like(layer.v).tril())
        lik = dkm.GaussianLikelihood(noise, learn_noise=False)
        full_value = dkm.FullDKMObjective(full, lik).log_objective(y)[0].item()

        sparse = dkm.SparseDKM(x, 2, num_layers=2, kernel="relu", nu=[0.7, 3.0], learn_inducing=False)
        sparse.load_state_dict({**sparse.state_dict(), **{k: v for k, v in full.state_dict().items() if "stack" in k}})
        k_top, _ = sparse.stack(dkm.input_gram(x))
        sparse.output.set_optimal_gaussian(k_top.ii.detach(), y, noise)
        loss, _ = dkm.SparseDKMObjective(sparse, lik, num_data=9)(x, y)
    assert -9 * loss.item() == pytest.approx(full_value, abs=1e-8)


def test_output_layer_predictive_matches_explicit_formula() -> None:
    z, x = torch.randn(5, 3, dtype=D), torch.randn(4, 3, dtype=D)
    model = dkm.SparseDKM(z, 2, num_layers=1)
    with torch.no_grad():
        model.output.mu.normal_()
        model.output.v.add_(0.3 * torch.randn(5, 5, dtype=D).tril())
    out = model(x)
    k, _ = model.stack(dkm.input_gram(model.inducing_inputs, x))
    k_ii, k_ti = k.ii.detach(), k.ti.detach()
    chol_a = model.output.chol_cov().detach()
    b = k_ti @ torch.linalg.inv(k_ii)
    mean = b @ model.output.mu.detach()
    var = k.t.detach() - (b @ k_ti.T).diagonal() + (b @ chol_a @ chol_a.T @ b.T).diagonal()
    assert torch.allclose(out.mean, mean, atol=1e-9)
    assert torch.allclose(out.var, var, atol=1e-9)


def test_minibatch_objectives_average_to_the_full_batch_objective() -> None:
    x, y = torch.randn(20, 3, dtype=D), torch.randn(20, dtype=D)
    model = dkm.SparseDKM.from_data(x, 1, 6, num_layers=1)
    objective = dkm.SparseDKMObjective(model, dkm.GaussianLikelihood(), num_data=20)
    full, _ = objective(x, y)
    parts = [objective(x[i : i + 5], y[i : i + 5])[0] for i in range(0, 20, 5)]
    assert torch.stack(parts).mean().item() == pytest.approx(full.item(), abs=1e-12)


def test_gaussian_expected_log_prob_matches_quadrature() -> None:
    lik = dkm.GaussianLikelihood(0.3)
    y, m, v = torch.tensor([[0.4]], dtype=D), torch.tensor([[-0.2]], dtype=D), torch.tensor([0.5], dtype=D)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    f = -0.2 + np.sqrt(0.5) * nodes
    expected = (weights * (-0.5 * np.log(2 * np.pi * 0.3) - (0.4 - f) ** 2 / 0.6)).sum() / weights.sum()
    assert lik.expected_log_prob(y, m, v).item() == pytest.approx(expected, abs=1e-10)


def test_categorical_expected_log_prob_and_prediction_match_quadrature() -> None:
    lik = dkm.CategoricalLikelihood(num_samples=200_000, predict_samples=200_000)
    m = torch.tensor([[0.3, -0.5]], dtype=D)
    v = torch.tensor([0.8], dtype=D)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    w = np.outer(weights, weights) / weights.sum() ** 2
    f0 = 0.3 + np.sqrt(0.8) * nodes[:, None]
    f1 = -0.5 + np.sqrt(0.8) * nodes[None, :]
    logp0 = f0 - np.logaddexp(f0, f1)
    ell = lik.expected_log_prob(torch.tensor([0]), m, v).item()
    assert ell == pytest.approx((w * logp0).sum(), abs=5e-3)
    proba = lik.predict_log_proba(m, v).exp()
    assert proba[0, 0].item() == pytest.approx((w * np.exp(logp0)).sum(), abs=5e-3)
    # zero variance: the softmax of the mean
    assert torch.allclose(lik.predict_log_proba(m, torch.zeros(1, dtype=D)), torch.log_softmax(m, -1))


def test_nngp_model_has_no_gram_parameters_and_zero_kl() -> None:
    z = torch.randn(5, 3, dtype=D)
    model = dkm.SparseDKM(z, 1, num_layers=2, nu=float("inf"))
    assert all(layer.v is None for layer in model.stack.layers)
    assert abs(model(torch.randn(3, 3, dtype=D)).kl.item()) < 1e-10


def test_bad_inputs_raise_klcore_errors() -> None:
    z = torch.randn(5, 3, dtype=D)
    model = dkm.SparseDKM(z, 3)
    objective = dkm.SparseDKMObjective(model, dkm.CategoricalLikelihood(), num_data=10)
    with pytest.raises(NonFiniteError):
        model(torch.tensor([[float("nan"), 0.0, 0.0]], dtype=D))
    with pytest.raises(ShapeError, match="features"):
        model(torch.randn(2, 4, dtype=D))
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        objective(torch.randn(2, 3, dtype=D), torch.tensor([0, 3]))
    with pytest.raises(DTypeError):
        objective(torch.randn(2, 3, dtype=D), torch.tensor([0.0, 1.0]))
    with pytest.raises(DTypeError):
        model(torch.zeros(2, 3, dtype=torch.long))


def test_non_psd_kernel_raises_not_psd_error_naming_the_layer() -> None:
    layer = dkm.GramLayer(3, 1.0, name="layer 2")
    bad = GramBlocks(-torch.eye(3, dtype=D), torch.zeros(1, 3, dtype=D), torch.ones(1, dtype=D))
    with pytest.raises(NotPSDError, match="layer 2"):
        layer(bad)
