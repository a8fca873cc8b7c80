"""Reference sequence log-probs of the offline pairs: computed once, cached to a safetensors file, reused.

The cache stores ``ref_chosen_logps`` and ``ref_rejected_logps`` (``[n]`` float32) with two
fingerprints in its metadata: the token data (``TokenizedPairs.fingerprint``) and the reference model
(its class, config and the sum of every parameter tensor). A cache whose fingerprints differ is
recomputed and overwritten, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hypo.data import TokenizedPairs
from hypo.forward import completion_logprobs_chunked


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class, config (when it has one) and per-tensor parameter sums."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    h.update(sums.numpy().tobytes())
    return h.hexdigest()


def compute_reference_logps(
    model: nn.Module, data: TokenizedPairs, *, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` ``[n]`` float32 sequence log-probs of the pairs under ``model`` (CPU tensors)."""
    device = next(model.parameters()).device
    index = torch.arange(len(data))
    was_training = model.training
    model.eval()
    try:
        out = []
        for which in ("chosen", "rejected"):
            seqs = {k: v.to(device) for k, v in data.sequences(index, which).items()}
            out.append(completion_logprobs_chunked(model, seqs, batch_size).sum(-1).cpu())
    finally:
        model.train(was_training)
    return out[0], out[1]


def reference_logps(
    model: nn.Module, data: TokenizedPairs, *, cache_path: str | Path | None = None, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(chosen, rejected)`` log-probs, read from ``cache_path`` when it matches, else computed
    (and written there atomically when a path is given)."""
    meta = {"data": data.fingerprint(), "model": model_fingerprint(model)}
    path = Path(cache_path) if cache_path else None
    if path is not None and path.is_file():
        try:
            stored_meta = _metadata(path)
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            warnings.warn(f"reference log-prob cache {path} is unreadable ({exc}); recomputing", stacklevel=2)
        else:
            if stored_meta == meta and {"ref_chosen_logps", "ref_rejected_logps"} <= set(tensors):
                return tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]
            warnings.warn(f"reference log-prob cache {path} is for other data or another model; recomputing", stacklevel=2)
    chosen, rejected = compute_reference_logps(model, data, batch_size=batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        save_file({"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    return chosen, rejected


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


__all__ = ["compute_reference_logps", "model_fingerprint", "reference_logps"]
