"""Row-chunked evaluation over the last (vocabulary) axis (private).

A ``[..., V]`` input is viewed as ``[N, V]`` rows; a per-row function runs on ``chunk_size`` rows at a
time after upcasting that chunk to float32, so no float32 copy of the whole input ever exists. With
``checkpoint=True`` each chunk is recomputed in backward instead of keeping its float32 intermediates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from klcore.errors import ConfigError

#: Elements of float32 work memory per chunk when ``chunk_size`` is not given: 512 KiB on the CPU
#: (the intermediates stay in cache, and glibc serves buffers this small from its heap instead of
#: mapping and faulting in fresh pages for each chunk: about 3.5x faster than 16 MiB chunks at
#: V = 32k), 32 MiB on accelerators (fewer kernel launches).
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 17, "accelerator": 1 << 23}

RowFn = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def rows_per_chunk(
    vocab: int, chunk_size: int | None, device: torch.device, *, elements: dict[str, int] | None = None
) -> int:
    """Rows per chunk: ``chunk_size``, or the float32 element budget (``elements``, default
    ``DEFAULT_CHUNK_ELEMENTS``) of the device kind divided by ``vocab``."""
    if chunk_size is None:
        budget = (elements or DEFAULT_CHUNK_ELEMENTS)["cpu" if device.type == "cpu" else "accelerator"]
        return max(1, budget // max(vocab, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return chunk_size


def map_rows(
    fn: RowFn,
    rows: tuple[torch.Tensor, ...],
    *,
    chunk_size: int | None,
    checkpoint: bool,
    vocab: int,
) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` to row chunks of every tensor in ``rows`` (all ``[N, ...]``); concatenate outputs.

    ``fn`` receives the chunks in the order given and returns one tensor or a tuple of ``[n]`` tensors.
    """
    n = rows[0].shape[0]
    step = rows_per_chunk(vocab, chunk_size, rows[0].device)
    # not conditioned on the rows requiring grad: ``fn`` may close over trainable tensors (an output head)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    outs: list[tuple[torch.Tensor, ...]] = []
    filled: tuple[torch.Tensor, ...] = ()
    for start in range(0, max(n, 1), step):
        chunk = tuple(r[start : start + step] for r in rows)
        out = _checkpoint(fn, *chunk, use_reentrant=False) if use_ckpt else fn(*chunk)
        out = out if isinstance(out, tuple) else (out,)
        if n <= step or any(o.requires_grad for o in out):
            outs.append(out)
            continue
        # results that autograd does not track go straight into preallocated outputs: no small tensor
        # per chunk outlives it, so the allocator reuses the chunk's float32 buffers for the next chunk
        if not filled:
            filled = tuple(o.new_empty((n, *o.shape[1:])) for o in out)
        for dest, o in zip(filled, out, strict=True):
            dest[start : start + o.shape[0]] = o
    if filled:
        return filled
    if len(outs) == 1:
        return outs[0]
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
