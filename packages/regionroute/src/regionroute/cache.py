"""Streaming, batched and resumable cache of what Flux training reads, for datasets that do not fit in memory.

:func:`build_flux_cache` reads ``batch_size`` records at a time, encodes their prompts and images (VAE or
the toy's pixel packing) and writes one safetensors shard per batch, so memory holds one batch whatever
the dataset's size. Each shard is written atomically and listed in ``cache.json`` after it is complete;
a build that stops part-way resumes at the first missing shard. The manifest holds a fingerprint of the
records (paths, sizes, modification times, prompts, objects), the styles, the image size and the batch
size; a folder built from anything else raises ``DataError``.

:class:`FluxCache` reads the rows a training step asks for (``take(index)``) from the shards; masks are
stored as 8-bit (``round(255 m)``, exact for 8-bit mask files) and returned as float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from klcore.errors import CheckpointError, DataError
from regionroute.data import EditRecord, build_tensors
from regionroute.train import pack_images

MANIFEST = "cache.json"
KEYS = ("text", "pooled", "latents", "context", "masks", "token_indices", "token_objects", "experts")


def _fingerprint(records: Sequence[EditRecord], styles: Sequence[str], size: int | None, batch_size: int) -> str:
    def stat(p: Path) -> list[int]:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]

    items = [
        [r.prompt, str(r.source), stat(r.source), str(r.target), stat(r.target), r.objects,
         {o: [str(p), stat(p)] for o, p in r.masks.items()}]
        for r in records
    ]
    blob = json.dumps({"records": items, "styles": list(styles), "size": size, "batch_size": batch_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


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
) -> FluxCache:
    """Encode ``records`` ``batch_size`` at a time into shards under ``out_dir`` (resuming a partial build).

    ``encode`` is the tokenizer's encode (style-token positions), ``encode_text(prompts) -> (text [b, T, D],
    pooled [b, D])`` must give every batch the same ``T`` (pad to a fixed length, as Flux's T5 does with
    ``max_sequence_length``); ``encode_images([b, 3, H, W] in [0, 1]) -> [b, N, C]`` packed latents
    (``functools.partial(encode_kontext, vae)`` for a real model)."""
    if not records:
        raise DataError("no records: the dataset is empty")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(records, styles, size, batch_size)
    manifest_path = out / MANIFEST
    shards = math.ceil(len(records) / batch_size)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            raise DataError(
                f"{out} holds a cache built from other records, styles, size or batch size; "
                "remove it or choose another folder"
            )
    else:
        manifest = {"fingerprint": fingerprint, "records": len(records), "batch_size": batch_size,
                    "styles": list(styles), "shards": [], "text_len": None, "image_shape": None}
    for i in range(shards):
        name = f"shard-{i:05d}.safetensors"
        if name in manifest["shards"] and (out / name).is_file():
            continue
        part = records[i * batch_size : (i + 1) * batch_size]
        data = build_tensors(part, encode, styles, size=size)
        with torch.no_grad():
            text, pooled = encode_text(data.prompts)
            tensors = {
                "text": text.float(), "pooled": pooled.float(),
                "latents": encode_images(data.targets).float(), "context": encode_images(data.sources).float(),
                "masks": (data.masks * 255).round().to(torch.uint8),
                "token_indices": data.token_indices, "token_objects": data.token_objects, "experts": data.experts,
            }
        del data
        shapes = {"text_len": int(text.shape[1]), "image_shape": list(tensors["masks"].shape[2:])}
        for key, value in shapes.items():
            if manifest.get(key) is None:
                manifest[key] = value
            elif manifest[key] != value:
                raise DataError(
                    f"shard {i} has {key} {value} but the shards before have {manifest[key]}: pad every prompt to one "
                    "fixed length (Flux's T5: max_sequence_length) and give every image one size (size=)"
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
        expected = math.ceil(self.size / self.batch_size)
        if len(self.manifest["shards"]) != expected:
            raise CheckpointError(
                f"{self.directory} holds {len(self.manifest['shards'])} of {expected} shards: the build stopped part-way; "
                "run build_flux_cache again with the same records to resume it"
            )

    def __len__(self) -> int:
        return self.size

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``index`` (any order, repeats allowed); token columns and objects padded to the rows' widest."""
        from safetensors import safe_open

        index = index.long().flatten()
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.size:
            raise DataError(f"indices must lie in [0, {self.size}), got {index.tolist()}")
        rows: list[dict[str, torch.Tensor] | None] = [None] * index.numel()
        for shard in torch.unique(index // self.batch_size).tolist():
            wanted = (index // self.batch_size == shard).nonzero().flatten()
            with safe_open(str(self.directory / self.manifest["shards"][shard]), framework="pt") as f:
                part = {k: f.get_tensor(k) for k in KEYS}
            for pos in wanted.tolist():
                local = int(index[pos]) % self.batch_size
                rows[pos] = {k: v[local] for k, v in part.items()}
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
