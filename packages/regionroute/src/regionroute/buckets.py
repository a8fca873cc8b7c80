"""Aspect-ratio buckets: a set of ``(height, width)`` sizes, each image sent to the nearest-aspect one.

As in diffusers' Flux Kontext LoRA script (``--aspect_ratio_buckets="h1,w1;h2,w2"``) and kohya's
bucketing: an image of ``H x W`` goes to the bucket whose aspect ``h / w`` is nearest to ``H / W`` in
log scale (ties: the first listed), is scaled (bicubic; its masks nearest) to the smallest size that
covers the bucket and centre-cropped to it. Batches are drawn within one bucket
(:class:`BucketBatches`): each epoch shuffles every bucket, cuts it into batches of ``batch_size``
(a bucket's last batch may be smaller), and shuffles the batches; the plan is a function of the seed
and the step only, so a resumed run draws the batches the uninterrupted one drew.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from klcore.errors import ConfigError, DataError

Bucket = tuple[int, int]


def parse_buckets(spec: str | Sequence[Sequence[int]], *, multiple: int = 1) -> list[Bucket]:
    """Buckets from diffusers' string ``"h1,w1;h2,w2"`` or a list of ``[h, w]``; sides must be positive
    multiples of ``multiple`` (e.g. 16 for Flux: VAE factor 8 times the 2x2 patch)."""
    if isinstance(spec, str):
        try:
            items = [tuple(int(v) for v in part.split(",")) for part in spec.replace(" ", "").split(";") if part]
        except ValueError as exc:
            raise ConfigError(f"aspect_ratio_buckets {spec!r} must look like '1024,1024;768,1360' (height,width;...)") from exc
    else:
        items = [tuple(int(v) for v in item) for item in spec]
    if not items or any(len(b) != 2 for b in items):
        raise ConfigError(f"aspect_ratio_buckets must list (height, width) pairs, got {spec!r}")
    buckets = [(int(b[0]), int(b[1])) for b in items]
    bad = [b for b in buckets if min(b) < 1 or b[0] % multiple or b[1] % multiple]
    if bad:
        raise ConfigError(f"bucket sides must be positive multiples of {multiple}, got {bad}")
    if len(set(buckets)) != len(buckets):
        raise ConfigError(f"aspect_ratio_buckets lists a size twice: {buckets}")
    return buckets


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect is nearest to ``height / width`` (log distance; ties: the first)."""
    if height < 1 or width < 1:
        raise DataError(f"image size must be positive, got {height}x{width}")
    aspect = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - aspect))


def cover_and_crop(img: Any, bucket: Bucket, resample: Any) -> Any:
    """PIL image scaled to cover ``bucket = (h, w)`` (aspect kept) and centre-cropped to it."""
    h, w = bucket
    scale = max(h / img.height, w / img.width)
    new_w, new_h = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), resample)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return img.crop((left, top, left + w, top + h))


class BucketBatches:
    """Batches of record indices drawn within buckets; ``batch(step)`` is fixed by ``seed`` and ``step``.

    ``bucket_of[i]`` is record ``i``'s bucket. An epoch is one pass over every record."""

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not bucket_of:
            raise DataError("no records to batch")
        self.members: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_of):
            self.members.setdefault(int(b), []).append(i)
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = sum(math.ceil(len(m) / batch_size) for m in self.members.values())
        self._plan: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's batches in the order they are drawn."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 17) % (2**31 - 1))
        batches: list[list[int]] = []
        for b in sorted(self.members):
            rows = self.members[b]
            order = [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()]
            batches += [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        plan = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        self._plan = (epoch, plan)
        return plan

    def batch(self, step: int) -> torch.Tensor:
        """Record indices ``[b]`` (``b <= batch_size``) of step ``step``, all from one bucket."""
        return torch.tensor(self.epoch(step // self.per_epoch)[step % self.per_epoch])


__all__ = ["Bucket", "BucketBatches", "cover_and_crop", "nearest_bucket", "parse_buckets"]
