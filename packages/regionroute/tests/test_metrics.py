from __future__ import annotations

import math

import pytest
import torch
from regionroute.metrics import (
    alexnet_lpips,
    background_lpips,
    background_metrics,
    background_mse,
    background_psnr,
    background_ssim,
    regional_style_matching,
    ssim_map,
)

from klcore.errors import CheckpointError, MaskError, ShapeError


def images_and_mask(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(2, 3, size, size, generator=g)
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 4:12, 6:14] = 1
    mask[1, :, 20:30, 2:9] = 1
    return ref, mask, g


def test_identical_images_give_zero_error_and_unit_ssim():
    ref, mask, _ = images_and_mask()
    m = background_metrics(ref, ref.clone(), mask, lpips=alexnet_lpips())
    assert m["bg/mse"] == 0 and math.isinf(m["bg/psnr"]) and m["bg/ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["bg/lpips"] == pytest.approx(0.0, abs=1e-7)


def test_edits_inside_the_mask_leave_background_metrics_unchanged():
    ref, mask, g = images_and_mask()
    pred = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    edited = torch.where(mask > 0, torch.rand(ref.shape, generator=g), pred)
    torch.manual_seed(0)
    lp = alexnet_lpips()
    a, b = background_metrics(pred, ref, mask, lpips=lp), background_metrics(edited, ref, mask, lpips=lp)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7)


def test_mse_and_psnr_closed_forms():
    ref, mask, _ = images_and_mask()
    pred = ref + 0.25 * (1 - mask)  # background shifted by 0.25 everywhere
    torch.testing.assert_close(background_mse(pred, ref, mask), torch.full((2,), 0.0625))
    torch.testing.assert_close(background_psnr(pred, ref, mask), torch.full((2,), -10 * math.log10(0.0625)))


def test_ssim_closed_form_for_constant_images():
    a, b = 0.3, 0.7
    x, y = (torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (a, b))
    expected = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    torch.testing.assert_close(ssim_map(x, y), torch.full((1, 6, 6), expected, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    assert background_ssim(x, y, mask).item() == pytest.approx(expected, rel=1e-5)


def test_lpips_is_a_symmetric_nonnegative_distance():
    ref, mask, g = images_and_mask(size=64)
    lp = alexnet_lpips()
    other = torch.rand(ref.shape, generator=g)
    d1, d2 = background_lpips(ref, other, mask, lp), background_lpips(other, ref, mask, lp)
    torch.testing.assert_close(d1, d2)
    assert (d1 > 0).all()


def test_alexnet_lpips_loads_user_weights(tmp_path):
    torch.manual_seed(3)
    src = alexnet_lpips()
    feats = {f"features.{i}.weight": torch.randn_like(c.weight) for i, c in zip([0, 3, 6, 8, 10], [s for s in src.modules() if isinstance(s, torch.nn.Conv2d)], strict=True)}
    feats.update({k.replace("weight", "bias"): torch.zeros(v.shape[0]) for k, v in list(feats.items())})
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate([64, 192, 384, 256, 256])}
    torch.save(feats, tmp_path / "alexnet.pth")
    torch.save(lins, tmp_path / "alex.pth")
    lp = alexnet_lpips(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    first_conv = next(m for m in lp.modules() if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(first_conv.weight, feats["features.0.weight"])
    torch.testing.assert_close(lp.weights[2].data, lins["lin2.model.1.weight"].flatten())
    with pytest.raises(CheckpointError):
        alexnet_lpips(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="lacks"):  # the two files swapped
        alexnet_lpips(tmp_path / "alex.pth", tmp_path / "alexnet.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="readable"):
        alexnet_lpips(lin_path=tmp_path / "junk.pth")


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=300, max_position_embeddings=32),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=16, patch_size=8),
        projection_dim=8,
    )
    return CLIPModel(cfg).eval()


def char_tokenizer(texts, padding=True, return_tensors="pt"):
    longest = max(len(t) for t in texts) + 2
    ids = [[1] + [3 + ord(c) % 290 for c in t] + [2] + [0] * (longest - len(t) - 2) for t in texts]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor([[int(i != 0) for i in row] for row in ids])}


def test_rsm_in_unit_interval_and_invariant_outside_the_mask():
    clip = tiny_clip()
    ref, mask, g = images_and_mask()
    rsm = regional_style_matching(ref, mask, ["pixel art", "stripes"], clip, char_tokenizer, padding=0.0)
    assert rsm.shape == (2,) and ((rsm >= 0) & (rsm <= 1)).all()
    outside = torch.where(mask > 0, ref, torch.rand(ref.shape, generator=g))
    torch.testing.assert_close(regional_style_matching(outside, mask, ["pixel art", "stripes"], clip, char_tokenizer, padding=0.0), rsm)
    # independent: crop by hand (mask 0 rows 4:12, cols 6:14), resize, normalise, cosine
    crop = (ref[0] * mask[0])[:, 4:12, 6:14][None]
    pix = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bicubic", align_corners=False).clamp(0, 1)
    pix = (pix - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        fi = clip.get_image_features(pixel_values=pix)
        ft = clip.get_text_features(**char_tokenizer(["pixel art", "stripes"]))
    fi = fi if isinstance(fi, torch.Tensor) else fi.pooler_output
    ft = ft if isinstance(ft, torch.Tensor) else ft.pooler_output
    expected = 0.5 * (1 + torch.nn.functional.cosine_similarity(fi[0], ft[0], dim=0))
    assert rsm[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_metric_inputs_are_checked():
    ref, mask, _ = images_and_mask()
    with pytest.raises(ShapeError):
        background_mse(ref, ref, mask[:, :, :16])
    with pytest.raises(MaskError):
        background_mse(ref, ref, torch.ones_like(mask))
    with pytest.raises(MaskError):
        regional_style_matching(ref, torch.zeros_like(mask), ["a", "b"], tiny_clip(), char_tokenizer)
