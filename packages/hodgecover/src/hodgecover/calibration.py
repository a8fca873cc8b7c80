"""Calibration and evaluation token blocks from a text file, a ``datasets`` dataset or plain strings."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from klcore.errors import ConfigError, DataError


def _texts(source: Any, text_column: str) -> Iterable[str]:
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return [Path(source).read_text(encoding="utf-8")]
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    if isinstance(source, Path):
        raise DataError(f"calibration file {source} does not exist")
    if isinstance(source, str):
        try:
            import datasets
        except ImportError as err:
            raise DataError(f"{source!r} is not a file; loading it as a dataset needs `pip install hodgecover[datasets]`") from err
        name, _, rest = source.partition(":")
        subset, _, split = rest.partition(":")
        try:
            source = datasets.load_dataset(name, subset or None, split=split or "train")
        except Exception as err:
            raise DataError(f"could not load dataset {source!r} ({err}); give a local text file or name:subset:split") from err
    if hasattr(source, "column_names"):
        if text_column not in source.column_names:
            raise DataError(f"dataset has columns {source.column_names}, no {text_column!r}; set text_column")
        return (row[text_column] for row in source)
    raise DataError(f"unsupported calibration source {type(source).__name__}: give a file path, a dataset or strings")


def token_blocks(
    tokenizer: Any, source: Any, *, num_tokens: int = 2048, seq_len: int = 256, text_column: str = "text"
) -> torch.Tensor:
    """``[num_tokens // seq_len, seq_len]`` int64 blocks of consecutive tokens (documents joined by EOS).

    ``source``: a text file path, a ``datasets`` dataset (``text_column``), a ``name:subset:split`` dataset id, or
    a list of strings. Raises ``DataError`` when the source holds fewer than ``num_tokens`` tokens.
    """
    if seq_len < 2 or num_tokens < seq_len:
        raise ConfigError(f"need seq_len >= 2 and num_tokens >= seq_len, got {num_tokens}, {seq_len}")
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in _texts(source, text_column):
        if not text:
            continue
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= num_tokens:
            break
    blocks = num_tokens // seq_len
    if len(ids) < blocks * seq_len:
        raise DataError(f"the calibration source holds {len(ids)} tokens, fewer than {blocks * seq_len} requested; "
                        "lower num_tokens or give more text")
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, *, batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over all positions of ``tokens [N, T]``."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise DataError(f"tokens must be [N, T] with T >= 2, got {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    for chunk in tokens.to(device).split(batch_size):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return float(torch.exp(torch.tensor(nll / count)))


__all__ = ["perplexity", "token_blocks"]
