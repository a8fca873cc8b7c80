from __future__ import annotations

import math

import pytest
import torch
from regionroute.metrics import (
    ALEXNET_FILE,
    CLIP_MEAN,
    CLIP_STD,
    alexnet_lpips,
    background_lpips,
    background_metrics,
    background_mse,
    background_psnr,
    background_ssim,
    clip_preprocess,
    packaged_lpips_lin,
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
    m = background_metrics(ref, ref.clone(), mask, lpips=alexnet_lpips(demo=True))
    assert m["bg/mse"] == 0 and math.isinf(m["bg/psnr"]) and m["bg/ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["bg/lpips"] == pytest.approx(0.0, abs=1e-7)


def test_edits_inside_the_mask_leave_background_metrics_unchanged():
    ref, mask, g = images_and_mask()
    pred = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    edited = torch.where(mask > 0, torch.rand(ref.shape, generator=g), pred)
    torch.manual_seed(0)
    lp = alexnet_lpips(demo=True)
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
    torch.testing.assert_close(ssim_map(x, y), torch.full((1, 16, 16), expected, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    assert background_ssim(x, y, mask).item() == pytest.approx(expected, rel=1e-5)


def test_lpips_is_a_symmetric_nonnegative_distance():
    ref, mask, g = images_and_mask(size=64)
    lp = alexnet_lpips(demo=True)
    other = torch.rand(ref.shape, generator=g)
    d1, d2 = background_lpips(ref, other, mask, lp), background_lpips(other, ref, mask, lp)
    torch.testing.assert_close(d1, d2)
    assert (d1 > 0).all()


def test_alexnet_lpips_loads_user_weights(tmp_path):
    torch.manual_seed(3)
    src = alexnet_lpips(demo=True)
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
        alexnet_lpips(tmp_path / "alexnet.pth", lin_path=tmp_path / "junk.pth")


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
    # independent: crop by hand (mask 1 rows 20:30, cols 2:9, a 10x7 box), CLIPImageProcessor, cosine
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    crop = (ref[1] * mask[1])[:, 20:30, 2:9]
    pix = proc(images=[(crop.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        fi = clip.get_image_features(pixel_values=pix)
        ft = clip.get_text_features(**char_tokenizer(["pixel art", "stripes"]))
    fi = fi if isinstance(fi, torch.Tensor) else fi.pooler_output
    ft = ft if isinstance(ft, torch.Tensor) else ft.pooler_output
    expected = 0.5 * (1 + torch.nn.functional.cosine_similarity(fi[0], ft[1], dim=0))
    with_proc = regional_style_matching(ref, mask, ["pixel art", "stripes"], clip, char_tokenizer, padding=0.0, processor=proc)
    assert with_proc[1].item() == pytest.approx(expected.item(), rel=1e-6)
    assert rsm[1].item() == pytest.approx(expected.item(), abs=2e-3)  # clip_preprocess: the processor's steps in torch


def test_clip_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    g = torch.Generator().manual_seed(0)
    for h, w in [(50, 90), (90, 50), (200, 120), (20, 30)]:
        img = torch.nn.functional.avg_pool2d(torch.rand(1, 3, h, w, generator=g), 3, 1, 1)[0]
        u8 = (img.permute(1, 2, 0) * 255).round().to(torch.uint8)
        expected = proc(images=[u8.numpy()], return_tensors="pt")["pixel_values"][0]
        ours = clip_preprocess(u8.permute(2, 0, 1).float() / 255, 32)
        assert ours.shape == expected.shape == (3, 32, 32)
        # PIL's antialiased bicubic on 8-bit values vs torch's: within 8-bit rounding (1/255 = 0.015 normalised)
        assert (ours - expected).abs().max() < 0.03 and (ours - expected).abs().mean() < 0.01
        stretched = torch.nn.functional.interpolate(img[None], size=(32, 32), mode="bicubic")[0]  # the old way
        stretched = (stretched - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
        assert (stretched - expected).abs().mean() > 0.1


def reference_ssim(x, y, window=11, sigma=1.5):
    """Independent SSIM map in numpy float64: reflect-padded Gaussian statistics per pixel, channel mean."""
    import numpy as np

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    r = window // 2
    g = np.exp(-((np.arange(window) - r) ** 2) / (2 * sigma**2))
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    out = np.zeros(x.shape[0:1] + x.shape[2:])
    for b in range(x.shape[0]):
        maps = []
        for c in range(x.shape[1]):
            px, py = np.pad(x[b, c], r, mode="reflect"), np.pad(y[b, c], r, mode="reflect")
            m = np.zeros(x.shape[2:])
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    wx, wy = px[i : i + window, j : j + window], py[i : i + window, j : j + window]
                    mx, my = (kernel * wx).sum(), (kernel * wy).sum()
                    vx = max((kernel * wx * wx).sum() - mx * mx, 0.0)
                    vy = max((kernel * wy * wy).sum() - my * my, 0.0)
                    cxy = (kernel * wx * wy).sum() - mx * my
                    m[i, j] = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx * mx + my * my + 1e-4) * (vx + vy + 9e-4))
            maps.append(m)
        out[b] = np.mean(maps, 0)
    return torch.from_numpy(out)


def test_ssim_equals_an_independent_formula():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 14, 17, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    torch.testing.assert_close(ssim_map(x, y), reference_ssim(x, y), atol=1e-12, rtol=1e-10)
    empty = torch.zeros(2, 1, 14, 17, dtype=torch.float64)
    torch.testing.assert_close(background_ssim(x, y, empty), reference_ssim(x, y).mean((1, 2)), atol=1e-12, rtol=1e-10)


def test_ssim_equals_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(4)
    xf, yf = torch.rand(2, 3, 32, 40, generator=g), torch.rand(2, 3, 32, 40, generator=g)
    expected = tm.structural_similarity_index_measure(xf, yf, data_range=1.0, reduction="none")
    torch.testing.assert_close(background_ssim(xf, yf, torch.zeros(2, 1, 32, 40)), expected, atol=1e-6, rtol=1e-6)
    mask = torch.zeros(2, 1, 32, 40)
    mask[:, :, 5:20, 8:30] = 1
    bg = 1 - mask
    _, full = tm.structural_similarity_index_measure(xf * bg, yf * bg, data_range=1.0, reduction="none", return_full_image=True)
    weighted = (full.mean(1) * bg[:, 0]).sum((1, 2)) / bg[:, 0].sum((1, 2))
    torch.testing.assert_close(background_ssim(xf, yf, mask), weighted, atol=1e-6, rtol=1e-6)


def test_background_ssim_handles_large_objects_and_soft_masks():
    ref, _, g = images_and_mask(size=64)
    pred = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    big = torch.ones(2, 1, 64, 64)
    big[:, :, :8] = 0  # the object covers all but an 8-px strip
    soft = torch.full((2, 1, 64, 64), 0.5)
    for mask in (big, soft):
        values = background_ssim(pred, ref, mask)
        assert torch.isfinite(values).all() and ((values > 0) & (values < 1)).all()
        m = background_metrics(pred, ref, mask, lpips=alexnet_lpips(demo=True))
        assert all(math.isfinite(v) for v in m.values())
    edited = torch.where(big > 0, torch.rand(ref.shape, generator=g), pred)
    torch.testing.assert_close(background_ssim(edited, ref, big), background_ssim(pred, ref, big))
    with pytest.raises(MaskError, match="whole image"):
        background_ssim(pred, ref, torch.ones(2, 1, 64, 64))


def test_lpips_needs_real_weights_outside_demo(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached AlexNet
    with pytest.raises(CheckpointError, match="real weights"):
        alexnet_lpips()
    demo = alexnet_lpips(demo=True)
    assert demo.source.startswith("random backbone (demo)")


def test_lpips_uses_the_lpips_package_linear_weights(tmp_path, monkeypatch):
    lin = packaged_lpips_lin("alex")
    if lin is None:
        pytest.skip("the lpips package is not installed (its weights/v0.1/alex.pth is what this test loads)")
    torch.manual_seed(3)
    feats = {f"features.{i}.{p}": t for i, (o, c, k) in zip([0, 3, 6, 8, 10], [(64, 3, 11), (192, 64, 5), (384, 192, 3), (256, 384, 3), (256, 256, 3)], strict=True)
             for p, t in (("weight", 0.05 * torch.randn(o, c, k, k)), ("bias", torch.zeros(o)))}
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(feats, hub / "checkpoints" / ALEXNET_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    lp = alexnet_lpips()  # both found: the cached backbone and the installed package's linear layers
    state = torch.load(lin, map_location="cpu", weights_only=True)
    for k, w in enumerate(lp.weights):
        torch.testing.assert_close(w.data, state[f"lin{k}.model.1.weight"].flatten())
    assert str(lin) in lp.source and ALEXNET_FILE in lp.source
    assert all((w >= 0).all() for w in lp.weights) and not all(torch.equal(w, torch.ones_like(w)) for w in lp.weights)


def test_metric_inputs_are_checked():
    ref, mask, _ = images_and_mask()
    with pytest.raises(ShapeError):
        background_mse(ref, ref, mask[:, :, :16])
    with pytest.raises(MaskError):
        background_mse(ref, ref, torch.ones_like(mask))
    with pytest.raises(MaskError):
        regional_style_matching(ref, torch.zeros_like(mask), ["a", "b"], tiny_clip(), char_tokenizer)
