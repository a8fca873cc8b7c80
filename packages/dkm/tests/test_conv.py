from __future__ import annotations

import dkm
import pytest
import torch
import torch.nn.functional as F
from dkm.conv import ConvDKM, ConvInputGram, ConvMixup, GlobalAveragePool, GramBatchNorm
from dkm.fitting import fit
from dkm.gram import GramBlocks

from klcore.errors import ConfigError, ShapeError

D = torch.float64


def test_conv_input_gram_matches_explicit_patches() -> None:
    x = torch.randn(2, 3, 5, 4, dtype=D)
    z = torch.randn(6, 3, 3, 3, dtype=D)
    g = ConvInputGram(z)(x)
    padded = F.pad(x, (1, 1, 1, 1))
    for b, i, j in [(0, 0, 0), (1, 2, 3), (0, 4, 1)]:
        patch = padded[b, :, i : i + 3, j : j + 3]
        assert torch.allclose(g.ti[b, i, j], (z * patch).sum((1, 2, 3)) / 27, atol=1e-12)
        assert g.t[b, i, j].item() == pytest.approx(patch.square().sum().item() / 27, abs=1e-12)
    assert torch.allclose(g.ii, torch.einsum("pchw,qchw->pq", z, z) / 27, atol=1e-12)


def test_conv_input_gram_at_an_inducing_patch_reproduces_g_ii() -> None:
    x = torch.randn(1, 2, 5, 5, dtype=D)
    z = torch.stack([x[0, :, 1:4, 1:4], x[0, :, 0:3, 2:5]])  # patches centred at (2, 2) and (1, 3)
    g = ConvInputGram(z)(x)
    assert torch.allclose(g.ti[0, 2, 2], g.ii[0], atol=1e-12)
    assert torch.allclose(g.ti[0, 1, 3], g.ii[1], atol=1e-12)
    assert g.t[0, 2, 2].item() == pytest.approx(g.ii[0, 0].item(), abs=1e-12)


def test_conv_mixup_matches_explicit_sums() -> None:
    mix = ConvMixup(4, 3, stride=1)
    k_ii = torch.randn(4, 4, dtype=D)
    k_ti = torch.randn(2, 5, 5, 4, dtype=D)
    k_t = torch.rand(2, 5, 5, dtype=D)
    out = mix(GramBlocks(k_ii, k_ti, k_t))
    c = mix.weight.detach() / 2.0  # 1 / sqrt(P_in)
    expected_ii = sum(c[:, :, a, b] @ k_ii @ c[:, :, a, b].T for a in range(3) for b in range(3)) / 9
    assert torch.allclose(out.ii, expected_ii, atol=1e-12)
    padded = F.pad(k_ti, (0, 0, 1, 1, 1, 1))
    i, j = 2, 4
    expected_ti = sum(c[:, :, a, b] @ padded[1, i + a, j + b] for a in range(3) for b in range(3)) / 9
    assert torch.allclose(out.ti[1, i, j], expected_ti, atol=1e-12)
    padded_t = F.pad(k_t, (1, 1, 1, 1))
    assert out.t[1, i, j].item() == pytest.approx(padded_t[1, i : i + 3, j : j + 3].mean().item(), abs=1e-12)


def test_gram_batch_norm_normalises_means() -> None:
    norm = GramBatchNorm()
    g = GramBlocks(3.0 * torch.eye(4, dtype=D), torch.randn(2, 3, 3, 4, dtype=D), 5.0 + torch.rand(2, 3, 3, dtype=D))
    out = norm(g)
    assert out.ii.diagonal().mean().item() == pytest.approx(1.0)
    assert out.t.mean().item() == pytest.approx(1.0)
    mean_t = g.t.mean()
    assert torch.allclose(out.ti, g.ti / torch.sqrt(3.0 * mean_t), atol=1e-12)


def test_global_average_pool_matches_explicit_nystrom_covariance() -> None:
    z = torch.randn(5, 7, dtype=D)
    k_ii = z @ z.T / 7 + 0.1 * torch.eye(5, dtype=D)
    k_ti = torch.randn(2, 2, 3, 5, dtype=D)
    k_t = 10.0 + torch.rand(2, 2, 3, dtype=D)
    out = GlobalAveragePool()(GramBlocks(k_ii, k_ti, k_t))
    for b in range(2):
        rows = k_ti[b].reshape(6, 5)
        cov = rows @ torch.linalg.solve(k_ii, rows.T)  # Nystrom cross-location covariance
        cov = cov - torch.diag(cov.diagonal()) + torch.diag(k_t[b].reshape(6))  # exact on the diagonal
        assert out.t[b].item() == pytest.approx(cov.mean().item(), abs=1e-10)
        assert torch.allclose(out.ti[b], rows.mean(0))


def test_conv_dkm_initial_kl_is_zero_and_it_learns_stripes() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40
    y = torch.arange(n) % 2
    base = torch.zeros(n, 1, 6, 6, dtype=D)
    base[y == 0, :, ::2, :] = 1.0  # horizontal stripes
    base[y == 1, :, :, ::2] = 1.0  # vertical stripes
    x = base + 0.3 * torch.randn(n, 1, 6, 6, generator=gen, dtype=D)
    model = ConvDKM.from_images(x, 2, 12, strides=(2,), nu=0.01)
    objective = dkm.SparseDKMObjective(model, dkm.CategoricalLikelihood(num_samples=4, predict_samples=64), n)
    assert abs(model(x).kl.item()) < 1e-8
    fit(objective, x, y, epochs=25, batch_size=20, lr=0.03, progress=False)
    with torch.no_grad():
        out = model(x)
        accuracy = (out.mean.argmax(-1) == y).double().mean().item()
    assert accuracy > 0.9
    with pytest.raises(ShapeError):
        model(torch.randn(2, 3, 6, 6, dtype=D))


def test_reference_padding_averages_only_pixels_inside_the_image() -> None:
    x = torch.randn(1, 2, 4, 5, dtype=D)
    z = torch.randn(3, 2, 3, 3, dtype=D)
    ours = ConvInputGram(z)(x)
    reference = ConvInputGram(z, count_include_pad=False)(x)
    sq = x[0].square().mean(0)
    assert reference.t[0, 0, 0].item() == pytest.approx(sq[:2, :2].mean().item(), abs=1e-12)  # 4 pixels
    assert ours.t[0, 0, 0].item() == pytest.approx(sq[:2, :2].sum().item() / 9, abs=1e-12)
    assert reference.t[0, 2, 2].item() == pytest.approx(sq[1:4, 1:4].mean().item(), abs=1e-12)  # interior
    assert torch.equal(reference.ti, ours.ti)
    k = GramBlocks(torch.eye(3, dtype=D), torch.randn(1, 4, 5, 3, dtype=D), sq[None])
    mixed = ConvMixup(3, 3, count_include_pad=False)(k)
    assert mixed.t[0, 3, 4].item() == pytest.approx(sq[2:, 3:].mean().item(), abs=1e-12)


def test_conv_dkm_head_is_kernel_then_batch_norm_then_output() -> None:
    x = torch.randn(6, 1, 6, 6, dtype=D)
    model = ConvDKM.from_images(x, 2, 10)
    k_top, _ = model._propagate(model.input())
    assert k_top.ii.diagonal().mean().item() == pytest.approx(1.0, abs=1e-12)  # normalised, learned scale 1
    plain = ConvDKM.from_images(x, 2, 10, head_norm=False, count_include_pad=False)
    assert plain.head_norm is None and not plain.input.count_include_pad
    assert plain(x).mean.shape == (6, 2)


def test_from_images_refuses_more_patches_than_exist() -> None:
    image = torch.randn(1, 1, 3, 3, dtype=D)
    with pytest.raises(ConfigError, match="only 1 distinct 3x3 patches"):
        ConvDKM.from_images(image, 2, 32)
    with pytest.raises(ShapeError, match="H, W >= 3"):
        ConvDKM.from_images(torch.randn(2, 1, 2, 5, dtype=D), 2, 1)
    flat = torch.zeros(4, 1, 5, 5, dtype=D)  # one distinct patch only (all zeros): duplicates are not counted
    with pytest.raises(ConfigError, match="only 1 distinct"):
        ConvDKM.from_images(flat, 2, 2)
