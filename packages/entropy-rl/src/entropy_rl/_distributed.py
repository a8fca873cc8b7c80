"""Gathering per-token tensors of all data-parallel ranks (private).

Ranks may hold different numbers of rows and different widths ``T``; rows are stacked in rank
order and zero-padded on the right to the widest ``T``, so a zero mask marks the padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


def world_size(accelerator: Accelerator | None) -> int:
    return 1 if accelerator is None else int(accelerator.num_processes)


def gather_rows(channels: torch.Tensor, accelerator: Accelerator | None) -> tuple[torch.Tensor, int]:
    """``[rows, T, C]`` float32 on this rank -> ``([all rows, max T, C], index of this rank's first row)``."""
    if accelerator is None or accelerator.num_processes == 1:
        return channels, 0
    device = channels.device
    shape = torch.tensor([channels.shape[0], channels.shape[1]], device=device)
    shapes = accelerator.gather(shape).view(-1, 2).tolist()
    max_rows = max(r for r, _ in shapes)
    max_width = max(w for _, w in shapes)
    padded = torch.zeros(max_rows, max_width, channels.shape[2], dtype=channels.dtype, device=device)
    padded[: channels.shape[0], : channels.shape[1]] = channels
    everything = accelerator.gather(padded).view(len(shapes), max_rows, max_width, -1)
    stacked = torch.cat([everything[i, :rows] for i, (rows, _) in enumerate(shapes)])
    first = sum(rows for rows, _ in shapes[: accelerator.process_index])
    return stacked, first


def broadcast_from_main(t: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (``t`` must have the same shape and dtype everywhere)."""
    if world_size(accelerator) == 1:
        return t
    from accelerate.utils import broadcast

    return broadcast(t.contiguous(), from_process=0)
