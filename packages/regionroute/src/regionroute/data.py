"""Editing records (JSON), style-token indices, and the tensors one training batch needs.

A record (one JSON object in a list)::

    {"prompt": "make the circle in stripes style, keep other area unchanged",
     "source": "img/0001.png", "target": "img/0001_stripes.png",
     "objects": {"circle": "stripes"},
     "masks": {"circle": "img/mask_0001_circle.png"}}      # optional: default mask_{image}_{obj}.png

Paths are relative to the JSON file. Masks are read as grey, scaled to [0, 1]. The supervised tokens
are the *style word's* tokens (as the reference), found by a contiguous match in the prompt's ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from klcore.errors import ConfigError, DataError, ShapeError
from regionroute.buckets import cover_and_crop


def word_token_indices(prompt_ids: Sequence[int], word_ids: Sequence[int], *, first_only: bool = False) -> list[int]:
    """0-based positions of every (non-overlapping, left to right) contiguous occurrence of ``word_ids`` in
    ``prompt_ids``; ``first_only=True`` keeps the first occurrence only (the reference's ``get_word_idx``)."""
    n, k = len(prompt_ids), len(word_ids)
    if k == 0:
        raise DataError("the word encodes to no tokens")
    found: list[int] = []
    start = 0
    while start <= n - k:
        if list(prompt_ids[start : start + k]) == list(word_ids):
            found += range(start, start + k)
            if first_only:
                break
            start += k
        else:
            start += 1
    if not found:
        raise DataError(f"word ids {list(word_ids)} do not occur in the prompt ids {list(prompt_ids)}; put the style word in the prompt")
    return found


def style_token_indices(
    encode: Callable[[str], Sequence[int]], prompt: str, word: str, *, lowercase: bool = False, first_only: bool = False
) -> list[int]:
    """Positions of ``word``'s tokens in ``encode(prompt)``, every occurrence (``first_only=True``: the
    first, as the reference); ``encode`` adds no special tokens at the
    start (T5's ``tokenizer.encode`` qualifies; for CLIP pass ``lambda t: tok.encode(t)[1:]`` and add 1).
    ``lowercase=True`` reproduces the reference (which lowercases, though T5 is case-sensitive)."""
    if lowercase:
        prompt, word = prompt.lower(), word.lower()
    if word not in prompt:
        raise DataError(f"style word {word!r} is not in the prompt {prompt!r}")
    word_ids = _strip_eos(list(encode(word)), list(encode("")))
    return word_token_indices(list(encode(prompt)), word_ids, first_only=first_only)


def _strip_eos(word_ids: list[int], empty_ids: list[int]) -> list[int]:
    """Drop the special tokens an encoder appends to every text (T5's EOS)."""
    if empty_ids and word_ids[-len(empty_ids) :] == empty_ids:
        return word_ids[: -len(empty_ids)]
    return word_ids


@dataclass
class EditRecord:
    """One editing example with absolute paths; ``objects`` maps object name to style word."""

    prompt: str
    source: Path
    target: Path
    objects: dict[str, str]
    masks: dict[str, Path]


def load_records(path: str | Path) -> list[EditRecord]:
    """Read and check a JSON list of records (see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"records file {file} does not exist")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{file} must hold a non-empty JSON list of records, got {type(raw).__name__} of length {len(raw) if hasattr(raw, '__len__') else '?'}")
    records = []
    for i, item in enumerate(raw):
        missing = [k for k in ("prompt", "source", "target", "objects") if k not in item]
        if missing:
            raise DataError(f"record {i} of {file} lacks {missing}")
        if not isinstance(item["objects"], dict) or not item["objects"]:
            raise DataError(f"record {i}: objects must be a non-empty {{object: style}} table")
        source = file.parent / item["source"]
        stem = Path(item["source"]).stem
        masks = {
            obj: file.parent / item.get("masks", {}).get(obj, str(Path(item["source"]).parent / f"mask_{stem}_{obj}.png"))
            for obj in item["objects"]
        }
        for p in [source, file.parent / item["target"], *masks.values()]:
            if not p.is_file():
                raise DataError(f"record {i}: file {p} does not exist")
        for obj, style in item["objects"].items():
            if style not in item["prompt"]:
                raise DataError(f"record {i}: style word {style!r} (object {obj!r}) is not in the prompt {item['prompt']!r}")
        records.append(EditRecord(item["prompt"], source, file.parent / item["target"], dict(item["objects"]), masks))
    return records


def read_image(path: Path, size: int | None = None, *, bucket: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image ``[3, H, W]`` in [0, 1] (resized bicubic to ``size`` when given; with ``bucket = (h, w)``
    scaled to cover it and centre-cropped, :func:`regionroute.buckets.cover_and_crop`)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    if bucket is not None:
        img = cover_and_crop(img, bucket, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def read_mask(
    path: Path, shape: tuple[int, int], size: int | None = None, *, bucket: tuple[int, int] | None = None
) -> torch.Tensor:
    """Grey mask ``[H, W]`` in [0, 1]; its size must equal the image's ``shape`` (before any resize).

    With ``size`` it is resized (nearest, like :func:`read_image`'s resize of its image) to ``size x size``;
    with ``bucket`` covered and cropped with the image's geometry (nearest)."""
    from PIL import Image

    img = Image.open(path).convert("L")
    if (img.size[1], img.size[0]) != tuple(shape):
        raise ShapeError(
            f"mask {path} is {img.size[1]}x{img.size[0]} but its image is {shape[0]}x{shape[1]}; resize the mask"
        )
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    if bucket is not None:
        img = cover_and_crop(img, bucket, Image.Resampling.NEAREST)
    m = np.asarray(img, dtype=np.float32) / 255.0
    if m.max() == 0:
        raise DataError(f"mask {path} is empty (all zero)")
    return torch.from_numpy(m)


def _image_shape(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as stored (read from its header)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size[1], img.size[0]


@dataclass
class EditTensors:
    """Decoded records: ``sources``/``targets`` ``[n, 3, H, W]``, ``masks [n, O, H, W]`` (zero-padded),
    ``token_indices``/``token_objects`` ``[n, S]`` (``-1`` padding), ``experts [n]`` (index into ``styles``)."""

    prompts: list[str]
    sources: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor
    token_indices: torch.Tensor
    token_objects: torch.Tensor
    experts: torch.Tensor
    styles: list[str]


def build_tensors(
    records: Sequence[EditRecord], encode: Callable[[str], Sequence[int]], styles: Sequence[str], *,
    size: int | None = None, bucket: tuple[int, int] | None = None,
) -> EditTensors:
    """Read images and masks, find each object's style tokens; a record's expert is its first object's style.

    ``size``: resize every image to ``size x size``; ``bucket = (h, w)``: cover and centre-crop every image
    (and its masks) to ``h x w`` (one aspect-ratio bucket, :mod:`regionroute.buckets`)."""
    if not records:
        raise DataError("no records: the dataset is empty")
    if size is not None and bucket is not None:
        raise ConfigError("pass size= (square resize) or bucket= (cover and crop), not both")
    srcs: list[torch.Tensor] = []
    tgts, masks, toks, objs, experts = [], [], [], [], []
    for rec in records:
        src = read_image(rec.source, size, bucket=bucket)
        if srcs and src.shape != srcs[0].shape:
            raise ShapeError(
                f"{rec.source} is {tuple(src.shape)} but {records[0].source} is {tuple(srcs[0].shape)}; "
                "pass size= to resize every image to one square size"
            )
        srcs.append(src)
        tgts.append(read_image(rec.target, size, bucket=bucket))
        if tgts[-1].shape != src.shape:
            raise ShapeError(f"{rec.target} is {tuple(tgts[-1].shape)} but {rec.source} is {tuple(src.shape)}")
        shape = _image_shape(rec.source)
        masks.append(torch.stack([read_mask(rec.masks[o], shape, size, bucket=bucket) for o in rec.objects]))
        idx, obj = [], []
        for o_i, style in enumerate(rec.objects.values()):
            if style not in styles:
                raise DataError(f"style {style!r} of {rec.source} is not one of the experts {list(styles)}")
            pos = style_token_indices(encode, rec.prompt, style)
            idx += pos
            obj += [o_i] * len(pos)
        toks.append(idx)
        objs.append(obj)
        experts.append(list(styles).index(next(iter(rec.objects.values()))))
    width, n_obj = max(map(len, toks)), max(m.shape[0] for m in masks)
    pad = torch.zeros(len(records), n_obj, *srcs[0].shape[1:])
    for i, m in enumerate(masks):
        pad[i, : m.shape[0]] = m
    return EditTensors(
        prompts=[r.prompt for r in records],
        sources=torch.stack(srcs),
        targets=torch.stack(tgts),
        masks=pad,
        token_indices=torch.tensor([t + [-1] * (width - len(t)) for t in toks]),
        token_objects=torch.tensor([o + [-1] * (width - len(o)) for o in objs]),
        experts=torch.tensor(experts),
        styles=list(styles),
    )


__all__ = [
    "EditRecord",
    "EditTensors",
    "build_tensors",
    "load_records",
    "read_image",
    "read_mask",
    "style_token_indices",
    "word_token_indices",
]
