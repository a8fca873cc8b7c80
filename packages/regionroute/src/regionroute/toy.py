"""The offline toy world: coloured shapes on smooth backgrounds, styles applied inside the object's mask,
a word tokenizer and a frozen random text encoder built in code, and a tiny Flux config."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from klcore.errors import ConfigError, DataError

SHAPES = ("circle", "square", "diamond")
STYLES = ("stripes", "invert", "dots")
_WORDS = ("make", "the", "in", "style", ",", "keep", "other", "area", "unchanged", *SHAPES, *STYLES)


class WordTokenizer:
    """Whitespace word tokenizer over the toy vocabulary; ``encode`` appends EOS (id 1) like T5."""

    pad_id, eos_id = 0, 1

    def __init__(self, words: Sequence[str] = _WORDS) -> None:
        self.vocab = {w: i + 2 for i, w in enumerate(dict.fromkeys(words))}

    def __len__(self) -> int:
        return len(self.vocab) + 2

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self.vocab]
        if unknown:
            raise DataError(f"words {unknown} are not in the toy vocabulary {sorted(self.vocab)}")
        return [self.vocab[w] for w in text.split()] + [self.eos_id]


class ToyTextEncoder(nn.Module):
    """Frozen random text encoder: token embedding plus sinusoidal position, ``[B, T, dim]``; pooled = mean."""

    def __init__(self, vocab: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=g), requires_grad=False)
        self.dim = dim

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(ids.shape[1], dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        pe = torch.zeros(ids.shape[1], self.dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        hidden = self.embed[ids] + 0.5 * pe
        return hidden, hidden.mean(1)


def apply_style(image: np.ndarray, mask: np.ndarray, style: str) -> np.ndarray:
    """``image [H, W, 3]`` in [0, 1] with ``style`` applied where ``mask [H, W]`` is 1."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    if style == "stripes":
        styled = image * (0.25 + 0.75 * (((xx + yy) // 3) % 2))[..., None]
    elif style == "invert":
        styled = 1.0 - image
    elif style == "dots":
        styled = np.where(((yy % 4 < 2) & (xx % 4 < 2))[..., None], np.array([1.0, 1.0, 0.2]), image * 0.5)
    else:
        raise ConfigError(f"unknown toy style {style!r}; choose from {STYLES}")
    return np.where(mask[..., None] > 0, styled, image)


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    img = (1 - t)[..., None] * c0 + t[..., None] * c1
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = rng.uniform(0.18, 0.3) * size
    cy, cx = rng.uniform(r, size - r, 2)
    py, px = np.mgrid[0:size, 0:size]
    if shape == "circle":
        mask = (py - cy) ** 2 + (px - cx) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(py - cy) <= r * 0.85) & (np.abs(px - cx) <= r * 0.85)
    else:
        mask = np.abs(py - cy) + np.abs(px - cx) <= r * 1.2
    colour = rng.uniform(0.1, 0.9, 3)
    img = np.where(mask[..., None], colour, img)
    return img.astype(np.float32), mask.astype(np.float32), shape


def make_toy_dataset(out_dir: str | Path, *, n: int, size: int, styles: Sequence[str], seed: int = 0) -> Path:
    """Write ``n`` examples (PNG images and masks, ``records.json``) cycling over ``styles``; return the JSON path."""
    from PIL import Image

    if n < 1 or size < 8:
        raise ConfigError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    for i in range(n):
        style = styles[i % len(styles)]
        img, mask, shape = _scene(rng, size)
        target = apply_style(img, mask, style)
        name = f"{i:05d}"
        for arr, fname in ((img, f"{name}.png"), (target, f"{name}_{style}.png")):
            Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(out / "img" / fname)
        Image.fromarray((mask * 255).astype(np.uint8)).save(out / "img" / f"mask_{name}_{shape}.png")
        records.append({
            "prompt": f"make the {shape} in {style} style , keep other area unchanged",
            "source": f"img/{name}.png",
            "target": f"img/{name}_{style}.png",
            "objects": {shape: style},
        })
    path = out / "records.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def tiny_flux(*, channels: int = 12, heads: int = 4, head_dim: int = 16, dual: int = 2, single: int = 2,
              text_dim: int = 32, seed: int = 0, guidance_embeds: bool = False) -> nn.Module:
    """A small ``FluxTransformer2DModel`` with random weights (``axes_dims_rope`` sums to ``head_dim``;
    ``guidance_embeds=True`` as in the guidance-distilled FLUX.1-Kontext-dev)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    torch.manual_seed(seed)
    axes = [head_dim // 4, head_dim // 4, head_dim - 2 * (head_dim // 4)]
    return FluxTransformer2DModel(
        patch_size=1, in_channels=channels, num_layers=dual, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=text_dim, axes_dims_rope=axes,
        guidance_embeds=guidance_embeds,
    )


__all__ = [
    "SHAPES",
    "STYLES",
    "ToyTextEncoder",
    "WordTokenizer",
    "apply_style",
    "make_toy_dataset",
    "tiny_flux",
]
