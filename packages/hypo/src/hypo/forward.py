"""Per-token log-probs of given completions under a causal LM (one forward, response positions only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from klcore.logprobs import token_logprobs
from klcore.rollout import forward_accepts


def completion_logprobs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[rows, R]`` float32 log π(response token) at temperature 1, zero outside ``response_mask``.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``position_ids`` ``[rows, P + R]`` and
    ``responses``, ``response_mask`` ``[rows, R]`` (the layout of ``klcore.rollout.Rollout``). Models
    that accept ``logits_to_keep`` compute logits for the last R + 1 positions only.
    """
    responses = batch["responses"]
    r = responses.shape[1]
    kwargs: dict[str, Any] = {"logits_to_keep": r + 1} if forward_accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False, **kwargs,
    )
    logp = token_logprobs(out.logits[:, -(r + 1) : -1], responses)
    return logp * batch["response_mask"].to(logp.dtype)


@torch.no_grad()
def completion_logprobs_chunked(model: nn.Module, batch: Mapping[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """``completion_logprobs`` without grad, ``chunk`` rows per forward."""
    rows = batch["responses"].shape[0]
    parts = [completion_logprobs(model, {k: v[s : s + chunk] for k, v in batch.items()}) for s in range(0, rows, chunk)]
    return torch.cat(parts)


__all__ = ["completion_logprobs", "completion_logprobs_chunked"]
