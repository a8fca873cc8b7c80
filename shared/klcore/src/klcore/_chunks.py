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

#: Elements of float32 work memory per chunk when ``chunk_size`` is not given: 16 MiB on the CPU
#: (cache-friendly, and a peak below TRL's row loop), 32 MiB on accelerators (fewer kernel launches).
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 22, "accelerator": 1 << 23}

RowFn = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def rows_per_chunk(vocab: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is None:
        budget = DEFAULT_CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "accelerator"]
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
    for start in range(0, max(n, 1), step):
        chunk = tuple(r[start : start + step] for r in rows)
        out = _checkpoint(fn, *chunk, use_reentrant=False) if use_ckpt else fn(*chunk)
        outs.append(out if isinstance(out, tuple) else (out,))
    if len(outs) == 1:
        return outs[0]
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
