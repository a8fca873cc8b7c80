from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from regionroute.losses import cover_loss, focus_loss, layer_grid, region_attention_loss

from klcore.errors import ConfigError, MaskError, ShapeError


def test_focus_matches_explicit_kl_sum_and_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 9, generator=g, dtype=torch.float64)
    m = (torch.rand(5, 9, generator=g) > 0.5).double()
    m[:, 0] = 1
    got = focus_loss(a, m, tau=0.3)
    for r in range(5):
        p = [float(x) / float(m[r].sum()) for x in m[r]]
        z = sum(math.exp(float(x) / 0.3) for x in a[r])
        q = [math.exp(float(x) / 0.3) / z for x in a[r]]
        expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
        assert got[r].item() == pytest.approx(expected, rel=1e-5)
    assert (focus_loss(torch.randn(50, 16, generator=g), (torch.rand(50, 16, generator=g) > 0.3).float()) >= 0).all()


def test_focus_is_zero_iff_distributions_match():
    g = torch.Generator().manual_seed(1)
    soft = torch.rand(4, 10, generator=g, dtype=torch.float64) + 0.1
    a = 0.1 * torch.log(soft / soft.sum(-1, keepdim=True))  # softmax(a / 0.1) = soft / sum
    assert focus_loss(a, soft, tau=0.1).abs().max() < 1e-6
    assert (focus_loss(a + 0.05 * torch.randn(4, 10, generator=g, dtype=torch.float64), soft) > 1e-6).all()


def test_focus_closed_form_at_reference_defaults():
    n, k = 4096, 1024
    mask = torch.zeros(n, dtype=torch.float64)
    mask[:k] = 1
    expected = math.log(1 + (n - k) / (k * math.exp(10)))
    assert focus_loss(mask, mask, tau=0.1).item() == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(1.362e-4, rel=1e-3)


def test_focus_empty_mask_is_uniform_and_permutation_invariant():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(12, generator=g)
    uniform_kl = -math.log(12) - torch.log_softmax(a / 0.1, -1).mean().item()
    assert focus_loss(a, torch.zeros(12)).item() == pytest.approx(uniform_kl, rel=1e-5)
    m = (torch.rand(12, generator=g) > 0.5).float()
    perm = torch.randperm(12, generator=g)
    assert focus_loss(a[perm], m[perm]).item() == pytest.approx(focus_loss(a, m).item(), rel=1e-6)


def test_cover_bounds_closed_form_and_monotone():
    lo, hi = F.softplus(torch.tensor(-2.0)).item(), F.softplus(torch.tensor(2.0)).item()
    assert lo == pytest.approx(0.126928, abs=1e-6) and hi == pytest.approx(2.126928, abs=1e-6)
    g = torch.Generator().manual_seed(3)
    m = (torch.rand(64, generator=g) > 0.7).float()
    for _ in range(5):
        a = torch.rand(64, generator=g)
        per_pixel = torch.stack([cover_loss(a[i : i + 1], m[i : i + 1]) for i in range(64)])
        assert per_pixel.min() >= lo - 1e-6 and per_pixel.max() <= hi + 1e-6
    f = m.mean().item()
    assert cover_loss(m, m).item() == pytest.approx(f * 0.126928 + (1 - f) * math.log(2), rel=1e-5)
    values = [cover_loss(t * m, m).item() for t in torch.linspace(0, 1, 6)]
    assert all(x > y for x, y in itertools.pairwise(values))


def brute_region_loss(maps, masks, token_objects, tau, alpha, lf, lc):
    total = 0.0
    for amap in maps:
        side = math.isqrt(amap.shape[1])
        small = (F.interpolate(masks, size=(side, side), mode="nearest") > 0).float().flatten(2)
        per_sample = []
        for b in range(amap.shape[0]):
            objects = sorted({int(o) for o in token_objects[b] if o >= 0})
            per_obj = []
            for o in objects:
                cols = [s for s in range(token_objects.shape[1]) if token_objects[b, s] == o]
                vals = [
                    lf * focus_loss(amap[b, :, s], small[b, o], tau=tau) + lc * cover_loss(amap[b, :, s], small[b, o], alpha=alpha)
                    for s in cols
                ]
                per_obj.append(sum(vals) / len(vals))
            per_sample.append(sum(per_obj) / len(per_obj))
        total += sum(per_sample) / len(per_sample)
    return total / len(maps)


def test_region_loss_per_sample_per_object_matches_loops_and_single_runs():
    g = torch.Generator().manual_seed(4)
    maps = [torch.rand(2, 16, 3, generator=g), torch.rand(2, 4, 3, generator=g)]
    masks = torch.zeros(2, 2, 8, 8)
    masks[0, 0, :4, :4] = 1
    masks[0, 1, 4:, 4:] = 1
    masks[1, 0, 2:6, :] = 1
    token_objects = torch.tensor([[0, 1, 1], [0, 0, -1]])
    loss, metrics = region_attention_loss(maps, masks, token_objects, lambda_focus=0.1, lambda_cover=0.5)
    expected = brute_region_loss(maps, masks, token_objects, 0.1, 2.0, 0.1, 0.5)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert set(metrics) == {"attn/focus", "attn/cover", "attn/loss"}
    alone = [
        region_attention_loss([m[b : b + 1] for m in maps], masks[b : b + 1], token_objects[b : b + 1], lambda_cover=0.5)[0]
        for b in range(2)
    ]
    assert loss.item() == pytest.approx(sum(x.item() for x in alone) / 2, rel=1e-5)


def test_maps_first_averaging_averages_layers_before_the_loss():
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(3, 1, 16, 1, generator=g)
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, 1:3, 1:3] = 1
    token_objects = torch.tensor([[0]])
    got, _ = region_attention_loss(maps, masks, token_objects, average="maps", lambda_cover=0.0, lambda_focus=1.0)
    mean_map = maps.mean(0)[0, :, 0]
    assert got.item() == pytest.approx(focus_loss(mean_map, masks.flatten()).item(), rel=1e-6)
    with pytest.raises(ShapeError):
        region_attention_loss([torch.rand(1, 16, 1), torch.rand(1, 4, 1)], masks, token_objects, average="maps")


def test_region_loss_rejects_bad_inputs():
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., 0, 0] = 1
    with pytest.raises(MaskError):
        region_attention_loss([torch.rand(1, 16, 1)], masks * 3, torch.tensor([[0]]))
    with pytest.raises(ShapeError, match="grid"):
        region_attention_loss([torch.rand(1, 15, 1)], masks, torch.tensor([[0]]))
    with pytest.raises(MaskError):
        region_attention_loss([torch.rand(1, 16, 1)], masks, torch.tensor([[-1]]))
    with pytest.raises(ConfigError):
        focus_loss(torch.rand(3), torch.ones(3), tau=0.0)


def test_region_loss_rejects_non_finite_maps():
    from klcore.errors import NonFiniteError

    masks = torch.zeros(1, 1, 4, 4)
    masks[..., 0, 0] = 1
    amap = torch.rand(1, 16, 1)
    amap[0, 3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        region_attention_loss([amap], masks, torch.tensor([[0]]))


def test_transposed_masks_are_refused_on_a_non_square_grid():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, 32, 1, generator=g)]  # an 8 x 4 token grid (tall image)
    tall = torch.zeros(1, 1, 32, 16)
    tall[..., 4:20, 2:10] = 1
    objects = torch.zeros(1, 1, dtype=torch.long)
    loss, _ = region_attention_loss(maps, tall, objects, grid=(8, 4))
    inferred, _ = region_attention_loss(maps, tall, objects)
    torch.testing.assert_close(loss, inferred)
    wide = tall.transpose(2, 3).contiguous()  # the same mask transposed: 16 x 32, also 32 cells on a 4 x 8 grid
    region_attention_loss(maps, wide, objects)  # without the grid this cannot be told apart
    with pytest.raises(ShapeError, match="transposed"):
        region_attention_loss(maps, wide, objects, grid=(8, 4))
    with pytest.raises(ShapeError, match="aspects differ"):
        region_attention_loss(maps, torch.ones(1, 1, 32, 32), objects, grid=(8, 4))


def test_layer_grids_follow_unet_downsampling():
    assert layer_grid(96, (8, 12)) == (8, 12) and layer_grid(24, (8, 12)) == (4, 6) and layer_grid(6, (8, 12)) == (2, 3)
    assert layer_grid(4, (3, 3)) == (2, 2)  # rounding up at an odd size
    with pytest.raises(ShapeError):
        layer_grid(7, (8, 12))


def test_thin_objects_that_vanish_from_the_grid_warn():
    maps = [torch.rand(1, 64, 2)]  # 8 x 8 grid
    masks = torch.zeros(1, 2, 64, 64)
    masks[0, 0, 8:56, 30:32] = 1  # a 2-px pole: nearest resize to 8 x 8 samples columns 4, 12, ..., 60
    masks[0, 1, 10:40, 10:40] = 1
    objects = torch.tensor([[0, 1]])
    with pytest.warns(RuntimeWarning, match=r"1 object mask\(s\) \(sample, object\) \[\(0, 0\)\]"):
        region_attention_loss(maps, masks, objects, grid=(8, 8))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region_attention_loss(maps, masks, torch.tensor([[1, 1]]), grid=(8, 8))  # the pole is not supervised


def test_max_normalisation_puts_full_softmax_maps_on_the_reference_scale():
    g = torch.Generator().manual_seed(2)
    full = torch.rand(2, 16, 3, generator=g, dtype=torch.float64) / 40  # full-softmax values near 1 / (L + 2N)
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    masks[:, :, 1:3, 1:4] = 1
    objects = torch.zeros(2, 3, dtype=torch.long)
    scaled, _ = region_attention_loss([full * 7.0], masks, objects, normalize="max", lambda_cover=1.0)
    plain, metrics = region_attention_loss([full], masks, objects, normalize="max", lambda_cover=1.0)
    torch.testing.assert_close(scaled, plain)  # invariant to the maps' scale
    by_hand, _ = region_attention_loss([full / full.amax(1, keepdim=True)], masks, objects, lambda_cover=1.0)
    torch.testing.assert_close(plain, by_hand)
    _, raw_metrics = region_attention_loss([full], masks, objects, lambda_cover=1.0)
    # unnormalised, Cover sits at log 2 (softplus(0)) and Focus at the uniform value log(N / |M|)
    assert abs(raw_metrics["attn/cover"] - math.log(2)) < 0.05 and abs(raw_metrics["attn/focus"] - math.log(16 / 6)) < 0.05
    assert abs(metrics["attn/cover"] - math.log(2)) > 0.05
    with pytest.raises(ConfigError):
        region_attention_loss([full], masks, objects, normalize="sum")
