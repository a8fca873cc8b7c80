"""Mask-free regional editing with a trained expert (or the router) on the Kontext token layout.

``sample_edit`` integrates the flow ODE ``dx/dt = v(x_t, t)`` from ``t = 1`` (noise) to ``t = 0`` with
Euler steps, conditioning on the source image's tokens as Kontext does. Choose the expert first:
``moe.route(torch.tensor([k] * B))`` (hard) or ``moe.route_soft()`` (router). With ``mu`` (FLUX.1's
resolution-dependent time shift, :func:`flux_shift_mu`) and ``guidance`` it takes the same steps as
diffusers' ``FluxKontextPipeline`` (tested); ``encode_kontext`` / ``decode_kontext`` are the pipeline's
VAE steps. To edit through a real diffusers pipeline see :mod:`regionroute.pipelines`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from klcore.errors import ConfigError, ShapeError
from regionroute.train import flux_velocity, pack_latents, unpack_latents


def flux_shift_mu(
    image_tokens: int, *, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's time-shift ``mu``: linear in the number of target tokens, ``base_shift`` at ``base_seq_len``
    and ``max_shift`` at ``max_seq_len`` (the defaults are FLUX.1-Kontext-dev's scheduler config)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_tokens - base_seq_len)


def flow_times(steps: int, mu: float | None = None) -> list[float]:
    """The ``steps + 1`` times ``1 = t_0 > ... > t_steps = 0``: uniform, or shifted ``e^mu / (e^mu + 1/t - 1)``."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    times = [1.0 - i / steps for i in range(steps)]
    if mu is not None:
        times = [math.exp(mu) / (math.exp(mu) + 1.0 / t - 1.0) for t in times]
    return [*times, 0.0]


@torch.no_grad()
def sample_edit(
    model: nn.Module,
    context: torch.Tensor,
    text: torch.Tensor,
    pooled: torch.Tensor,
    image_size: tuple[int, int],
    *,
    steps: int = 10,
    generator: torch.Generator | None = None,
    reference_context_ids: bool = False,
    noise: torch.Tensor | None = None,
    mu: float | None = None,
    guidance: float | None = None,
) -> torch.Tensor:
    """Edited target tokens ``[B, N, C]`` for source tokens ``context [B, N, C]`` and a prompt's embeddings.

    ``text [B, T, D]``, ``pooled [B, D']``; ``image_size`` is the unpacked grid ``(h, w)``, ``N = (h/2)(w/2)``.
    ``noise [B, N, C]`` is the start (default: ``randn`` from ``generator``); ``mu`` shifts the times
    (:func:`flow_times`); ``guidance`` is needed by transformers with ``guidance_embeds``.
    """
    times = flow_times(steps, mu)
    if noise is not None and noise.shape != context.shape:
        raise ShapeError(f"noise {tuple(noise.shape)} must have the context's shape {tuple(context.shape)}")
    embeds_guidance = bool(getattr(getattr(model, "config", None), "guidance_embeds", False))
    if embeds_guidance and guidance is None:
        raise ConfigError("this transformer embeds guidance (guidance_embeds=True): pass guidance=, e.g. 3.5")
    if noise is None:
        noise = torch.randn(context.shape, generator=generator, dtype=context.dtype)
    x = noise.to(device=context.device, dtype=context.dtype)
    g = guidance if embeds_guidance else None  # the pipeline also ignores guidance_scale for other models
    for t_now, t_next in itertools.pairwise(times):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        v = flux_velocity(model, x, context, text, pooled, t, image_size, reference_context_ids=reference_context_ids,
                          guidance=g)
        x = x + (t_next - t_now) * v
    return x


def _vae_shift_scale(vae: Any) -> tuple[float, float]:
    shift = vae.config.shift_factor
    return (0.0 if shift is None else float(shift)), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_kontext(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Kontext tokens of ``images [B, 3, H, W]`` in [0, 1]: ``(mode(VAE(2x - 1)) - shift) * scale``, packed
    to ``[B, N, 4 C]`` as ``FluxKontextPipeline`` does with its context image."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ShapeError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    shift, scale = _vae_shift_scale(vae)
    latents = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist.mode()
    return pack_latents((latents - shift) * scale)


@torch.no_grad()
def decode_kontext(vae: Any, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images ``[B, 3, height, width]`` in [0, 1] from Kontext tokens ``[B, N, 4 C]`` (the pipeline's decode)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if height % (2 * factor) or width % (2 * factor):
        raise ShapeError(f"height and width must be multiples of {2 * factor}, got {height}x{width}")
    shift, scale = _vae_shift_scale(vae)
    latents = unpack_latents(tokens, height // factor, width // factor) / scale + shift
    return (vae.decode(latents.to(vae.dtype)).sample / 2 + 0.5).clamp(0, 1)


__all__ = ["decode_kontext", "encode_kontext", "flow_times", "flux_shift_mu", "sample_edit"]
