"""Regional editing metrics: Regional Style Matching (CLIP) and background MSE / PSNR / SSIM / LPIPS.

Images are ``[B, C, H, W]`` in [0, 1]; ``mask [B, 1, H, W]`` is 1 on the edited object (M) and the
background is ``1 - M``. Every background metric ignores what happens inside the mask:

* MSE_bg ``= sum B (x - y)^2 / (C sum B)``, PSNR_bg ``= 10 log10(1 / MSE_bg)`` (inf when equal);
* SSIM_bg: the mean of the SSIM map (Gaussian window 11, sigma 1.5) over background pixels whose
  whole window lies in the background;
* LPIPS_bg: LPIPS on ``(x * B, y * B)`` (PIE-Bench's protocol) with a backbone whose weights the
  user supplies (:func:`alexnet_lpips`);
* RSM ``= (1 + cos(f_img(crop_bbox(x * M)), f_text(style))) / 2`` with a transformers ``CLIPModel``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from klcore.errors import CheckpointError, MaskError, NonFiniteError, ShapeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    if pred.dim() != 4 or pred.shape != ref.shape:
        raise ShapeError(f"images must be two [B, C, H, W] tensors of one shape, got {tuple(pred.shape)}, {tuple(ref.shape)}")
    if mask.shape != (pred.shape[0], 1, *pred.shape[2:]):
        raise ShapeError(
            f"mask must be [B, 1, H, W] = {(pred.shape[0], 1, *pred.shape[2:])}, got {tuple(mask.shape)}; resize it to the image"
        )
    if not (torch.isfinite(pred).all() and torch.isfinite(ref).all()):
        raise NonFiniteError("images hold NaN or inf")
    if (mask < 0).any() or (mask > 1).any():
        raise MaskError("mask must lie in [0, 1]")


def background_mse(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the background ``1 - mask``, per image ``[B]`` (float32)."""
    _check(pred, ref, mask)
    bg = 1.0 - mask.float()
    area = bg.sum((1, 2, 3))
    if (area == 0).any():
        raise MaskError("a mask covers the whole image: there is no background to compare")
    return (bg * (pred.float() - ref.float()).square()).sum((1, 2, 3)) / (pred.shape[1] * area)


def background_psnr(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``10 log10(1 / MSE_bg)`` per image (inf where the background is identical)."""
    return -10.0 * torch.log10(background_mse(pred, ref, mask))


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(pred: torch.Tensor, ref: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM map (data range 1, K1 = 0.01, K2 = 0.03) on the valid region, channel mean: ``[B, H-w+1, W-w+1]``.

    Float32 (float64 inputs stay float64)."""
    c1, c2 = 0.01**2, 0.03**2
    dtype = torch.promote_types(pred.dtype, torch.float32)
    x, y = pred.to(dtype), ref.to(dtype)
    k = _gaussian_window(window, sigma, x.shape[1], x.device, dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(1)


def background_ssim(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, *, window: int = 11) -> torch.Tensor:
    """Mean SSIM over background pixels whose whole window is background, per image ``[B]``."""
    _check(pred, ref, mask)
    if min(pred.shape[2:]) < window:
        raise ShapeError(f"images of {tuple(pred.shape[2:])} are smaller than the SSIM window {window}")
    bg = 1.0 - mask.float()
    clean = (F.avg_pool2d(bg, window, stride=1) > 1 - 1e-6).float()[:, 0]
    if (clean.sum((1, 2)) == 0).any():
        raise MaskError(f"no background pixel has a full {window}x{window} background window; use a smaller window")
    smap = ssim_map(pred, ref, window=window)
    return (smap * clean.to(smap.dtype)).sum((1, 2)) / clean.sum((1, 2))


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) over a feature backbone: ``stages`` applied in turn, each output a
    compared feature map; ``d = sum_l mean_hw || w_l * (u_l(x) - u_l(y)) ||^2`` with ``u`` the
    channel-normalised features and ``w_l`` non-negative per-channel weights (ones by default).

    Inputs are in [0, 1]; they are mapped to [-1, 1] and through LPIPS's fixed scaling layer.
    """

    _shift: torch.Tensor  # buffers registered in __init__
    _scale: torch.Tensor

    shift = (-0.030, -0.088, -0.188)
    scale = (0.458, 0.448, 0.450)

    def __init__(self, stages: Sequence[nn.Module], channels: Sequence[int]) -> None:
        super().__init__()
        if len(stages) != len(channels) or not stages:
            raise ShapeError(f"need one channel count per stage, got {len(stages)} stages and {len(channels)} counts")
        self.stages = nn.ModuleList(stages)
        self.weights = nn.ParameterList([nn.Parameter(torch.ones(c), requires_grad=False) for c in channels])
        self.register_buffer("_shift", torch.tensor(self.shift).view(1, 3, 1, 1))
        self.register_buffer("_scale", torch.tensor(self.scale).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B]`` distances of ``x``, ``y`` ``[B, 3, H, W]`` in [0, 1]."""
        hx, hy = (2 * x.float() - 1 - self._shift) / self._scale, (2 * y.float() - 1 - self._shift) / self._scale
        total = torch.zeros(x.shape[0], device=x.device)
        for stage, w in zip(self.stages, self.weights, strict=True):
            hx, hy = stage(hx), stage(hy)
            ux = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
            uy = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (w.view(1, -1, 1, 1) * (ux - uy).square()).sum(1).mean((1, 2))
        return total


def alexnet_lpips(features_path: str | Path | None = None, lin_path: str | Path | None = None) -> LPIPS:
    """LPIPS-alex. ``features_path``: torchvision's ``alexnet-owt-7be5be79.pth`` (keys ``features.N.*``);
    ``lin_path``: the ``lpips`` package's ``weights/v0.1/alex.pth`` (keys ``linK.model.1.weight``).
    Both load with ``weights_only=True``; without them the backbone is random (tests, smoke runs)."""
    convs = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
    layers = [nn.Conv2d(i, o, k, stride=s, padding=p) for i, o, k, s, p in convs]
    stages = [
        nn.Sequential(layers[0], nn.ReLU()),
        nn.Sequential(nn.MaxPool2d(3, 2), layers[1], nn.ReLU()),
        nn.Sequential(nn.MaxPool2d(3, 2), layers[2], nn.ReLU()),
        nn.Sequential(layers[3], nn.ReLU()),
        nn.Sequential(layers[4], nn.ReLU()),
    ]
    model = LPIPS(stages, [64, 192, 384, 256, 256])
    torchvision_index = [0, 3, 6, 8, 10]
    if features_path is not None:
        state = _load(features_path, [f"features.{i}.{p}" for i in torchvision_index for p in ("weight", "bias")])
        for conv, idx in zip(layers, torchvision_index, strict=True):
            assert conv.bias is not None  # the convolutions are built with bias=True
            conv.weight.data.copy_(state[f"features.{idx}.weight"])
            conv.bias.data.copy_(state[f"features.{idx}.bias"])
    if lin_path is not None:
        state = _load(lin_path, [f"lin{k}.model.1.weight" for k in range(len(model.weights))])
        for k, w in enumerate(model.weights):
            w.data.copy_(state[f"lin{k}.model.1.weight"].flatten())
    return model.eval()


def _load(path: str | Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """A ``weights_only`` state dict holding every name in ``keys`` (else CheckpointError)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {p} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p} is not a readable torch state dict ({exc}); pass torchvision's alexnet or lpips' alex.pth") from exc
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{p} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}; pass torchvision's alexnet or lpips' alex.pth")
    return state


def background_lpips(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, lpips: LPIPS) -> torch.Tensor:
    """LPIPS of the background-only images ``(pred * (1 - M), ref * (1 - M))``, per image ``[B]``."""
    _check(pred, ref, mask)
    bg = 1.0 - mask.float()
    with torch.no_grad():
        return lpips(pred.float() * bg, ref.float() * bg)


def masked_crop(image: torch.Tensor, mask: torch.Tensor, padding: float = 0.05) -> torch.Tensor:
    """``image * mask`` ``[C, H, W]`` cropped to the mask's bounding box grown by ``padding`` of its size."""
    ys, xs = torch.nonzero(mask[0] > 0, as_tuple=True)
    if ys.numel() == 0:
        raise MaskError("empty mask: RSM needs the edited object's mask")
    h, w = mask.shape[1:]
    py = math.ceil(padding * int(ys.max() - ys.min() + 1))
    px = math.ceil(padding * int(xs.max() - xs.min() + 1))
    y0, y1 = max(int(ys.min()) - py, 0), min(int(ys.max()) + py + 1, h)
    x0, x1 = max(int(xs.min()) - px, 0), min(int(xs.max()) + px + 1, w)
    return (image * mask)[:, y0:y1, x0:x1]


def regional_style_matching(
    images: torch.Tensor,
    masks: torch.Tensor,
    styles: Sequence[str],
    clip: Any,
    tokenizer: Callable[..., Any],
    *,
    padding: float = 0.05,
) -> torch.Tensor:
    """RSM ``[B]`` in [0, 1]: ``(1 + cos(image features of the masked crop, text features of the style)) / 2``.

    ``clip``: a transformers ``CLIPModel`` (``CLIPModel.from_pretrained(local_folder)``);
    ``tokenizer(texts, padding=True, return_tensors="pt")`` its tokenizer.
    """
    if images.dim() != 4 or masks.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ShapeError(f"need images [B, 3, H, W] and masks [B, 1, H, W], got {tuple(images.shape)}, {tuple(masks.shape)}")
    if len(styles) != images.shape[0]:
        raise ShapeError(f"{len(styles)} style texts for {images.shape[0]} images")
    size = clip.config.vision_config.image_size
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    crops = [
        F.interpolate(masked_crop(img.float(), m, padding)[None], size=(size, size), mode="bicubic", align_corners=False)
        for img, m in zip(images, masks, strict=True)
    ]
    pixels = ((torch.cat(crops).clamp(0, 1) - mean) / std).to(next(clip.parameters()).device)
    tokens = tokenizer(list(styles), padding=True, return_tensors="pt")
    with torch.no_grad():
        img = _features(clip.get_image_features(pixel_values=pixels))
        txt = _features(clip.get_text_features(**{k: v.to(pixels.device) for k, v in tokens.items()}))
    return 0.5 * (1 + F.cosine_similarity(img.float(), txt.float(), dim=-1)).cpu()


def _features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def background_metrics(
    pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, lpips: LPIPS | None = None
) -> dict[str, float]:
    """Batch means ``bg/mse``, ``bg/psnr``, ``bg/ssim`` and (with an LPIPS model) ``bg/lpips``."""
    out = {
        "bg/mse": float(background_mse(pred, ref, mask).mean()),
        "bg/psnr": float(background_psnr(pred, ref, mask).mean()),
        "bg/ssim": float(background_ssim(pred, ref, mask, window=min(11, *pred.shape[2:])).mean()),
    }
    if lpips is not None:
        out["bg/lpips"] = float(background_lpips(pred, ref, mask, lpips).mean())
    return out


__all__ = [
    "LPIPS",
    "alexnet_lpips",
    "background_lpips",
    "background_metrics",
    "background_mse",
    "background_psnr",
    "background_ssim",
    "masked_crop",
    "regional_style_matching",
    "ssim_map",
]
