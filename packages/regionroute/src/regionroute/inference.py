"""Mask-free regional editing with a trained expert (or the router) on the Kontext token layout.

``sample_edit`` integrates the flow ODE ``dx/dt = v(x_t, t)`` from ``t = 1`` (noise) to ``t = 0`` with
Euler steps, conditioning on the source image's tokens as Kontext does. Choose the expert first:
``moe.route(torch.tensor([k] * B))`` (hard) or ``moe.route_soft()`` (router). For a real
``FluxKontextPipeline`` the saved experts load with ``pipe.load_lora_weights(dir, adapter_name=style)``
and ``pipe.set_adapters([style], [1.0])`` (see docs/regionroute.md).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from klcore.errors import ConfigError
from regionroute.train import flux_velocity


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
) -> torch.Tensor:
    """Edited target tokens ``[B, N, C]`` for source tokens ``context [B, N, C]`` and a prompt's embeddings."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    x = torch.randn(context.shape, generator=generator, dtype=context.dtype).to(context.device)
    times = torch.linspace(1.0, 0.0, steps + 1)
    for t_now, t_next in itertools.pairwise(times.tolist()):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        v = flux_velocity(model, x, context, text, pooled, t, image_size, reference_context_ids=reference_context_ids)
        x = x + (t_next - t_now) * v
    return x


__all__ = ["sample_edit"]
