"""Streaming, batched and resumable cache of what Flux training reads, for datasets that do not fit in memory.

:func:`build_flux_cache` reads ``batch_size`` records at a time, encodes their prompts and images (VAE or
the toy's pixel packing) and writes one safetensors shard per batch, so memory holds one batch whatever
the dataset's size. Each shard is written atomically and listed in ``cache.json`` after it is complete;
a build that stops part-way resumes at the first missing shard. The manifest holds a fingerprint of the
records (paths, sizes, modification times, prompts, objects), the styles, the image size and the batch
size (and the buckets); a folder built from anything else raises ``DataError``.

With ``buckets`` (aspect-ratio buckets, :mod:`regionroute.buckets`) each record is covered and cropped to
its nearest-aspect bucket and each shard holds records of one bucket; ``FluxCache.bucket_of`` tells the
trainer's :class:`~regionroute.buckets.BucketBatches` which records may share a batch. Every shard also
stores the unpacked latent ``grid`` of its rows.

:class:`FluxCache` reads the rows a training step asks for (``take(index)``) from the shards; masks are
stored as 8-bit (``round(255 m)``, exact for 8-bit mask files) and returned as float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from klcore.errors import CheckpointError, DataError
from regionroute.buckets import Bucket, nearest_bucket
from regionroute.data import EditRecord, _image_shape, build_tensors
from regionroute.train import latent_grid, pack_images

MANIFEST = "cache.json"
KEYS = ("text", "pooled", "latents", "context", "masks", "token_indices", "token_objects", "experts", "grid")


def _fingerprint(
    records: Sequence[EditRecord], styles: Sequence[str], size: int | None, batch_size: int, buckets: list[Bucket] | None
) -> str:
    def stat(p: Path) -> list[int]:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]

    items = [
        [r.prompt, str(r.source), stat(r.source), str(r.target), stat(r.target), r.objects,
         {o: [str(p), stat(p)] for o, p in r.masks.items()}]
        for r in records
    ]
    blob = json.dumps({"records": items, "styles": list(styles), "size": size, "batch_size": batch_size,
                       **({"buckets": buckets} if buckets else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _shard_plan(records: Sequence[EditRecord], batch_size: int, buckets: list[Bucket] | None) -> list[tuple[int, list[int]]]:
    """``(bucket, record indices)`` of every shard: consecutive chunks, or each bucket's records in order."""
    if not buckets:
        return [(0, list(range(i, min(i + batch_size, len(records))))) for i in range(0, len(records), batch_size)]
    bucket_of = [nearest_bucket(*_image_shape(r.source), buckets) for r in records]
    plan = []
    for b in range(len(buckets)):
        rows = [i for i, x in enumerate(bucket_of) if x == b]
        plan += [(b, rows[k : k + batch_size]) for k in range(0, len(rows), batch_size)]
    return plan


def build_flux_cache(
    records: Sequence[EditRecord],
    out_dir: str | Path,
    *,
    encode: Callable[[str], Sequence[int]],
    styles: Sequence[str],
    encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    encode_images: Callable[[torch.Tensor], torch.Tensor] = pack_images,
    size: int | None = None,
    batch_size: int = 8,
    buckets: Sequence[Bucket] | None = None,
) -> FluxCache:
    """Encode ``records`` ``batch_size`` at a time into shards under ``out_dir`` (resuming a partial build).

    ``encode`` is the tokenizer's encode (style-token positions), ``encode_text(prompts) -> (text [b, T, D],
    pooled [b, D])`` must give every batch the same ``T`` (pad to a fixed length, as Flux's T5 does with
    ``max_sequence_length``); ``encode_images([b, 3, H, W] in [0, 1]) -> [b, N, C]`` packed latents
    (``functools.partial(encode_kontext, vae)`` for a real model). ``buckets``: aspect-ratio buckets
    ``[(h, w), ...]`` (:mod:`regionroute.buckets`): each record goes to its nearest-aspect bucket and is
    covered and cropped to it, every shard holds one bucket's records (instead of ``size``)."""
    if not records:
        raise DataError("no records: the dataset is empty")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    bucket_list = [(int(h), int(w)) for h, w in buckets] if buckets else None
    if bucket_list and size is not None:
        raise DataError("pass size= (one square size) or buckets= (aspect-ratio buckets), not both")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(records, styles, size, batch_size, bucket_list)
    manifest_path = out / MANIFEST
    plan = _shard_plan(records, batch_size, bucket_list)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            raise DataError(
                f"{out} holds a cache built from other records, styles, size, buckets or batch size; "
                "remove it or choose another folder"
            )
    else:
        manifest = {"fingerprint": fingerprint, "records": len(records), "batch_size": batch_size,
                    "styles": list(styles), "buckets": bucket_list, "shards": [],
                    "shard_rows": [rows for _, rows in plan], "shard_bucket": [b for b, _ in plan],
                    "text_len": None, "image_shape": None}
    for i, (b, rows) in enumerate(plan):
        name = f"shard-{i:05d}.safetensors"
        if name in manifest["shards"] and (out / name).is_file():
            continue
        data = build_tensors([records[r] for r in rows], encode, styles, size=size,
                             bucket=bucket_list[b] if bucket_list else None)
        with torch.no_grad():
            text, pooled = encode_text(data.prompts)
            latents = encode_images(data.targets).float()
            grid = latent_grid(int(latents.shape[1]), (int(data.targets.shape[2]), int(data.targets.shape[3])))
            tensors = {
                "text": text.float(), "pooled": pooled.float(),
                "latents": latents, "context": encode_images(data.sources).float(),
                "masks": (data.masks * 255).round().to(torch.uint8),
                "token_indices": data.token_indices, "token_objects": data.token_objects, "experts": data.experts,
                "grid": torch.tensor([grid] * len(rows)),
            }
        del data
        shapes: dict[str, int | list[int]] = {"text_len": int(text.shape[1])}
        if not bucket_list:  # with buckets every shard has its bucket's size
            shapes["image_shape"] = list(tensors["masks"].shape[2:])
        for key, value in shapes.items():
            if manifest.get(key) is None:
                manifest[key] = value
            elif manifest[key] != value:
                raise DataError(
                    f"shard {i} has {key} {value} but the shards before have {manifest[key]}: pad every prompt to one "
                    "fixed length (Flux's T5: max_sequence_length) and give every image one size (size=) or use buckets="
                )
        _save_shard(tensors, out / name)
        manifest["shards"].append(name)
        _atomic_json(manifest_path, manifest)
    return FluxCache(out)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


class FluxCache:
    """A cache folder written by :func:`build_flux_cache`; ``take(index [b]) -> {key: [b, ...]}`` as training reads it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"no {MANIFEST} in {self.directory}: build the cache with build_flux_cache")
        self.manifest = json.loads(path.read_text())
        self.batch_size = int(self.manifest["batch_size"])
        self.size = int(self.manifest["records"])
        self.buckets: list[Bucket] = [(int(h), int(w)) for h, w in self.manifest.get("buckets") or []]
        rows, shard_bucket = self.manifest["shard_rows"], self.manifest["shard_bucket"]
        expected = len(rows)
        #: ``where[i] = (shard, row in shard)`` and ``bucket_of[i]`` of record ``i``
        self.where: list[tuple[int, int]] = [(0, 0)] * self.size
        self.bucket_of: list[int] = [0] * self.size
        for s, (part, b) in enumerate(zip(rows, shard_bucket, strict=True)):
            for j, r in enumerate(part):
                self.where[r], self.bucket_of[r] = (s, j), int(b)
        if len(self.manifest["shards"]) != expected:
            raise CheckpointError(
                f"{self.directory} holds {len(self.manifest['shards'])} of {expected} shards: the build stopped part-way; "
                "run build_flux_cache again with the same records to resume it"
            )

    def __len__(self) -> int:
        return self.size

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``index`` (record indices, any order, repeats allowed); token columns and objects padded to the
        rows' widest. With buckets every row must come from one bucket (:class:`regionroute.buckets.BucketBatches`)."""
        from safetensors import safe_open

        index = index.long().flatten()
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.size:
            raise DataError(f"indices must lie in [0, {self.size}), got {index.tolist()}")
        picked_buckets = {self.bucket_of[i] for i in index.tolist()}
        if len(picked_buckets) > 1:
            raise DataError(
                f"rows {index.tolist()} come from buckets {sorted(self.buckets[b] for b in picked_buckets)}: a batch "
                "stacks one size, draw it within a bucket (regionroute.buckets.BucketBatches)"
            )
        shard_of = [self.where[i][0] for i in index.tolist()]
        rows: list[dict[str, torch.Tensor] | None] = [None] * index.numel()
        for shard in sorted(set(shard_of)):
            with safe_open(str(self.directory / self.manifest["shards"][shard]), framework="pt") as f:
                part = {k: f.get_tensor(k) for k in KEYS}
            for pos, i in enumerate(index.tolist()):
                if shard_of[pos] == shard:
                    rows[pos] = {k: v[self.where[i][1]] for k, v in part.items()}
        picked = [r for r in rows if r is not None]
        return {k: _stack([r[k] for r in picked], k) for k in KEYS}


def _stack(values: list[torch.Tensor], key: str) -> torch.Tensor:
    """Stack rows, padding ``token_*`` with -1 and ``masks`` (8-bit) with empty objects; masks become float32."""
    if key in ("token_indices", "token_objects"):
        width = max(v.shape[0] for v in values)
        return torch.stack([torch.cat([v, v.new_full((width - v.shape[0],), -1)]) for v in values])
    if key == "masks":
        objects = max(v.shape[0] for v in values)
        return torch.stack([torch.cat([v, v.new_zeros(objects - v.shape[0], *v.shape[1:])]) for v in values]).float() / 255
    return torch.stack(values)


__all__ = ["KEYS", "MANIFEST", "FluxCache", "build_flux_cache"]
