"""Regional editing metrics: Regional Style Matching (CLIP) and background MSE / PSNR / SSIM / LPIPS.

Images are ``[B, C, H, W]`` in [0, 1]; ``mask [B, 1, H, W]`` is 1 on the edited object (M) and the
background is ``1 - M``. Every background metric ignores what happens inside the mask:

* MSE_bg ``= sum B (x - y)^2 / (C sum B)``, PSNR_bg ``= 10 log10(1 / MSE_bg)`` (inf when equal);
* SSIM_bg: torchmetrics' SSIM map (Gaussian window 11, sigma 1.5, reflect padding) of the
  background-only images ``(x * B, y * B)``, averaged with weights ``B``;
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
    """SSIM map ``[B, H, W]`` (channel mean; data range 1, K1 = 0.01, K2 = 0.03, Gaussian window) as
    torchmetrics computes it: reflect padding by ``window // 2``, variances clamped at 0. Its mean over
    all pixels is torchmetrics' ``structural_similarity_index_measure(data_range=1.0)``.

    Float32 (float64 inputs stay float64)."""
    if window % 2 == 0 or min(pred.shape[2:]) <= window // 2:
        raise ShapeError(f"need an odd window smaller than twice the image side, got {window} for {tuple(pred.shape[2:])}")
    c1, c2 = 0.01**2, 0.03**2
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pad = window // 2
    x, y = (F.pad(t.to(dtype), (pad, pad, pad, pad), mode="reflect") for t in (pred, ref))
    k = _gaussian_window(window, sigma, x.shape[1], x.device, dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy = (blur(x * x) - mx**2).clamp_min(0), (blur(y * y) - my**2).clamp_min(0)
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(1)


def background_ssim(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, *, window: int = 11) -> torch.Tensor:
    """SSIM of the background-only images ``(pred * (1 - M), ref * (1 - M))`` (as LPIPS_bg), its map
    averaged with weights ``1 - M``: ``[B]``. With an empty mask it is torchmetrics' SSIM; edits inside a
    binary mask cannot change it; soft masks weigh pixels by their background share. Any amount of
    background works (a mask covering everything raises ``MaskError``)."""
    _check(pred, ref, mask)
    bg = 1.0 - mask.float()
    area = bg.sum((1, 2, 3))
    if (area == 0).any():
        raise MaskError("a mask covers the whole image: there is no background to compare")
    smap = ssim_map(pred * bg, ref * bg, window=window)
    weight = bg[:, 0].to(smap.dtype)
    return (smap * weight).sum((1, 2)) / weight.sum((1, 2))


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) over a feature backbone: ``stages`` applied in turn, each output a
    compared feature map; ``d = sum_l mean_hw || w_l * (u_l(x) - u_l(y)) ||^2`` with ``u`` the
    channel-normalised features and ``w_l`` non-negative per-channel weights (ones by default).

    Inputs are in [0, 1]; they are mapped to [-1, 1] and through LPIPS's fixed scaling layer.
    """

    _shift: torch.Tensor  # buffers registered in __init__
    _scale: torch.Tensor
    source: str = "user-built"  # which weights (alexnet_lpips sets it)

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


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def packaged_lpips_lin(net: str = "alex") -> Path | None:
    """The ``lpips`` package's linear-layer weights ``weights/v0.1/{net}.pth``, found without importing
    it (its import pulls torchvision); None when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / f"{net}.pth"
    return path if path.is_file() else None


def cached_alexnet() -> Path | None:
    """torchvision's AlexNet weights in torch hub's cache (``$TORCH_HOME/hub/checkpoints``), if present."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    return path if path.is_file() else None


def alexnet_lpips(
    features_path: str | Path | None = None, lin_path: str | Path | None = None, *, demo: bool = False
) -> LPIPS:
    """LPIPS-alex with real weights. ``features_path``: torchvision's ``alexnet-owt-7be5be79.pth`` (keys
    ``features.N.*``; default: torch hub's cache); ``lin_path``: the ``lpips`` package's
    ``weights/v0.1/alex.pth`` (keys ``linK.model.1.weight``; default: the installed package's file).
    Both load with ``weights_only=True``. A missing file raises ``CheckpointError`` unless ``demo=True``,
    which uses a random backbone (and unit linear weights when lpips is absent): numbers that test
    plumbing only. ``model.source`` says which weights were used."""
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
    features = Path(features_path) if features_path is not None else cached_alexnet()
    lin = Path(lin_path) if lin_path is not None else packaged_lpips_lin("alex")
    if not demo and (features is None or lin is None):
        raise CheckpointError(
            "LPIPS needs real weights: "
            + ("pass torchvision's AlexNet weights (lpips_features=.../alexnet-owt-7be5be79.pth) or put them in "
               f"{Path(torch.hub.get_dir()) / 'checkpoints'}; " if features is None else "")
            + ("pip install lpips (its weights/v0.1/alex.pth) or pass lpips_lin=...; " if lin is None else "")
            + "random weights only in demo mode"
        )
    torchvision_index = [0, 3, 6, 8, 10]
    if features is not None:
        state = _load(features, [f"features.{i}.{p}" for i in torchvision_index for p in ("weight", "bias")])
        for conv, idx in zip(layers, torchvision_index, strict=True):
            assert conv.bias is not None  # the convolutions are built with bias=True
            conv.weight.data.copy_(state[f"features.{idx}.weight"])
            conv.bias.data.copy_(state[f"features.{idx}.bias"])
    if lin is not None:
        state = _load(lin, [f"lin{k}.model.1.weight" for k in range(len(model.weights))])
        for k, w in enumerate(model.weights):
            w.data.copy_(state[f"lin{k}.model.1.weight"].flatten())
    model.source = (
        f"alexnet {features}; lin {lin}" if features is not None and lin is not None
        else f"random backbone (demo); lin {lin if lin is not None else 'ones (demo)'}"
    )
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


def clip_preprocess(
    image: torch.Tensor, size: int, crop_size: int | None = None, *,
    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIPImageProcessor's steps on ``image [3, h, w]`` in [0, 1]: resize the shortest side to ``size``
    (bicubic with antialias; the long side ``int(size * long / short)``), center crop ``crop_size``
    (default ``size``), normalise. Returns ``[3, crop_size, crop_size]`` float32."""
    crop_size = size if crop_size is None else crop_size
    h, w = image.shape[1:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if h <= w else (new_long, size)
    resized = F.interpolate(image.float()[None], size=new_hw, mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = max((new_hw[0] - crop_size) // 2, 0), max((new_hw[1] - crop_size) // 2, 0)
    crop = resized[:, top : top + crop_size, left : left + crop_size].clamp(0, 1)
    return (crop - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def regional_style_matching(
    images: torch.Tensor,
    masks: torch.Tensor,
    styles: Sequence[str],
    clip: Any,
    tokenizer: Callable[..., Any],
    *,
    padding: float = 0.05,
    processor: Any = None,
) -> torch.Tensor:
    """RSM ``[B]`` in [0, 1]: ``(1 + cos(image features of the masked crop, text features of the style)) / 2``.

    ``clip``: a transformers ``CLIPModel`` (``CLIPModel.from_pretrained(local_folder)``);
    ``tokenizer(texts, padding=True, return_tensors="pt")`` its tokenizer. ``processor``: the folder's
    ``CLIPImageProcessor`` (given 8-bit crops, as it expects); without it :func:`clip_preprocess` does the
    same steps at the vision tower's ``image_size``.
    """
    if images.dim() != 4 or masks.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ShapeError(f"need images [B, 3, H, W] and masks [B, 1, H, W], got {tuple(images.shape)}, {tuple(masks.shape)}")
    if len(styles) != images.shape[0]:
        raise ShapeError(f"{len(styles)} style texts for {images.shape[0]} images")
    crops = [masked_crop(img.float(), m, padding) for img, m in zip(images, masks, strict=True)]
    if processor is not None:
        arrays = [(c.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for c in crops]
        pixels = processor(images=arrays, return_tensors="pt")["pixel_values"]
    else:
        size = clip.config.vision_config.image_size
        pixels = torch.stack([clip_preprocess(c, size) for c in crops])
    pixels = pixels.to(next(clip.parameters()).device)
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
        "bg/ssim": float(background_ssim(pred, ref, mask, window=min(11, 2 * min(pred.shape[2:]) - 1)).mean()),
    }
    if lpips is not None:
        out["bg/lpips"] = float(background_lpips(pred, ref, mask, lpips).mean())
    return out


__all__ = [
    "ALEXNET_FILE",
    "LPIPS",
    "alexnet_lpips",
    "cached_alexnet",
    "clip_preprocess",
    "background_lpips",
    "background_metrics",
    "background_mse",
    "background_psnr",
    "background_ssim",
    "masked_crop",
    "packaged_lpips_lin",
    "regional_style_matching",
    "ssim_map",
]
