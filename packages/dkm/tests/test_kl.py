from __future__ import annotations

import dkm
import numpy as np
import pytest
import torch

from klcore.errors import NonFiniteError, NotPSDError, ShapeError

D = torch.float64


def _spd(p: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p + 2, generator=gen, dtype=D)
    return a @ a.T / (p + 2) + 0.1 * torch.eye(p, dtype=D)


def test_gaussian_kl_matches_torch_distributions() -> None:
    g, k = _spd(5, 0), _spd(5, 1)
    zero = torch.zeros(5, dtype=D)
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(zero, g), torch.distributions.MultivariateNormal(zero, k)
    )
    assert dkm.gaussian_kl(g, k).item() == pytest.approx(ref.item(), rel=1e-12)


def test_gaussian_kl_matches_monte_carlo() -> None:
    g, k = _spd(3, 2), _spd(3, 3)
    zero = torch.zeros(3, dtype=D)
    p, q = torch.distributions.MultivariateNormal(zero, g), torch.distributions.MultivariateNormal(zero, k)
    samples = p.sample((400_000,))
    mc = (p.log_prob(samples) - q.log_prob(samples)).mean()
    assert dkm.gaussian_kl(g, k).item() == pytest.approx(mc.item(), abs=0.01)


def test_kl_and_its_gradient_vanish_at_g_equals_k() -> None:
    k = _spd(6, 4)
    g = k.clone().requires_grad_(True)
    kl = dkm.gaussian_kl(g, k)
    (grad,) = torch.autograd.grad(kl, g)
    assert abs(kl.item()) < 1e-12
    assert grad.abs().max().item() < 1e-10
    # away from G = K the gradient is 1/2 (K^-1 - G^-1), compared with autograd
    g2 = _spd(6, 5).requires_grad_(True)
    (grad2,) = torch.autograd.grad(dkm.gaussian_kl(g2, k), g2)
    expected = 0.5 * (torch.linalg.inv(k) - torch.linalg.inv(g2.detach()))
    assert torch.allclose(0.5 * (grad2 + grad2.T), expected, atol=1e-10)


def test_kl_bad_inputs_raise_klcore_errors() -> None:
    k = _spd(3, 6)
    with pytest.raises(ShapeError):
        dkm.gaussian_kl(k, _spd(4, 7))
    with pytest.raises(NotPSDError, match="G"):
        dkm.gaussian_kl(-k, k)
    bad = k.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        dkm.gaussian_kl(bad, k)


def test_safe_cholesky_retries_with_jitter_on_a_singular_matrix() -> None:
    x = torch.randn(5, 2, dtype=D)
    singular = x @ x.T  # rank 2
    chol = dkm.safe_cholesky(singular)
    assert torch.allclose(chol @ chol.T, singular, atol=1e-5)
    with pytest.raises(NotPSDError, match="layer 3"):
        dkm.safe_cholesky(singular - torch.eye(5, dtype=D), name="K_ii of layer 3")


def test_kl_and_jitter_reject_wrong_types_with_klcore_errors() -> None:
    from klcore.errors import ConfigError, DTypeError

    eye = torch.eye(3, dtype=torch.long)
    with pytest.raises(DTypeError, match="floating"):
        dkm.gaussian_kl(eye, eye)
    with pytest.raises(DTypeError):
        dkm.gaussian_kl([[1.0]], [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="jitter"), dkm.jitter("small"):  # type: ignore[arg-type]
        pass
    with dkm.jitter(np.float32(1e-5)):
        assert dkm.get_jitter() == pytest.approx(1e-5)
