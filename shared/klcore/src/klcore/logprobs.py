"""Per-token log-probabilities of taken tokens and per-token entropies, chunked over rows.

On CUDA with triton installed, ``token_logprobs``, ``token_entropy`` and
``token_logprobs_and_entropy`` run a fused kernel that reads each row once (online softmax) and
allocates nothing of size ``V``; set ``KLCORE_DISABLE_FUSED=1`` to use the chunked torch path.

Logits stay in their dtype; each chunk of rows is upcast to float32 on its own, so the peak extra
memory is one float32 chunk instead of a float32 copy of ``[B, T, V]``. The ``*_from_hidden``
variant also never forms the full logits: it multiplies a chunk of hidden states by the output head,
which together with ``checkpoint=True`` keeps training memory at one chunk of logits.
All results are float32 with the logits' leading shape (``[B, T]`` for ``[B, T, V]``).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from klcore import _checks
from klcore._chunks import map_rows
from klcore.errors import ConfigError, DTypeError, ShapeError

#: Set to 1 to use the chunked torch path on CUDA even when triton is installed.
DISABLE_FUSED_ENV = "KLCORE_DISABLE_FUSED"


def _use_fused(x: torch.Tensor) -> bool:
    """The fused Triton kernel runs for CUDA tensors when triton is importable (and not disabled)."""
    if not x.is_cuda or os.environ.get(DISABLE_FUSED_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    return importlib.util.find_spec("triton") is not None


def _temperature(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not float(t) > 0.0:
        raise ConfigError(f"temperature must be a positive number, got {t!r}")
    return float(t)


def _tokens(tokens: object, lead: torch.Size, vocab: int, device: torch.device) -> torch.Tensor:
    tok = _checks.tensor(tokens, "tokens")
    if tok.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"tokens must be int64 (or int32) ids, got dtype {tok.dtype}")
    if vocab < 1:
        raise ShapeError("the logits have an empty vocabulary axis (V = 0)")
    if tok.device != device:
        raise ShapeError(f"tokens are on {tok.device} but the logits are on {device}; move both to one device")
    if tok.shape != lead:
        raise ShapeError(f"tokens has shape {tuple(tok.shape)} but the logits' leading shape is {tuple(lead)}")
    if tok.numel() and bool(((tok < 0) | (tok >= vocab)).any()):
        raise ShapeError(
            f"tokens must lie in [0, {vocab}) (the vocabulary size), got values in [{int(tok.min())}, {int(tok.max())}]"
        )
    return tok


def _logits(logits: object) -> torch.Tensor:
    x = _checks.floating(logits, "logits")
    _checks.min_dims(x, "logits", 2, "[..., T, V]")
    return x


def _scaled(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    """A ``[n, V]`` chunk as float32 logits divided by the temperature."""
    z = x.float()
    return z * inv_t if inv_t != 1.0 else z


def _log_softmax(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    """float32 log-softmax of a ``[n, V]`` chunk at temperature 1 / inv_t.

    At temperature 1 the upcast happens inside the kernel (``dtype=float32``: no separate copy)."""
    if inv_t == 1.0:
        return torch.log_softmax(x, dim=-1, dtype=torch.float32)
    return torch.log_softmax(x.float() * inv_t, dim=-1)


def _lp_and_entropy(lp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Taken-token log-prob and entropy from float32 log-probs ``[n, V]``."""
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), _entropy(lp)


def _entropy(lp: torch.Tensor) -> torch.Tensor:
    """-sum p log p from float32 log-probs ``[n, V]``; tokens with p = 0 (-inf logits, e.g. masked
    vocabulary) add 0. Without autograd the plain product runs and only rows where it gave 0 * -inf
    are redone (a third faster on the CPU); with autograd the guarded form keeps NaN out of backward."""
    if torch.is_grad_enabled() and lp.requires_grad:
        return -torch.linalg.vecdot(lp.exp(), torch.where(torch.isneginf(lp), 0.0, lp))
    h = -torch.linalg.vecdot(lp.exp(), lp)
    bad = torch.isnan(h)
    if bool(bad.any()):
        rows = lp[bad]
        h[bad] = -torch.linalg.vecdot(rows.exp(), torch.where(torch.isneginf(rows), 0.0, rows))
    return h


def _fused_pair(x: torch.Tensor, tokens: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    from klcore import _fused

    return _fused.logprob_and_entropy(x, tokens, inv_t)


def _check_out(*outs: torch.Tensor) -> None:
    """One device sync for all outputs; name the first bad position when one is not finite."""
    if bool(torch.stack([torch.isfinite(o.detach()).all() for o in outs]).all()):
        return
    for out in outs:
        _checks.finite(out.detach(), "per-token result (the logits hold NaN or inf at this position)")


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per position: ``[..., V], [...] -> [...]`` float32."""
    x = _logits(logits)
    vocab, lead = x.shape[-1], x.shape[:-1]
    tok = _tokens(tokens, lead, vocab, x.device)
    inv_t = 1.0 / _temperature(temperature)
    if _use_fused(x):
        out = _fused_pair(x, tok, inv_t)[0]
        _check_out(out)
        return out

    def fn(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        z = _scaled(rows, inv_t)
        return z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

    (out,) = map_rows(
        fn, (x.reshape(-1, vocab), tok.reshape(-1)), chunk_size=chunk_size, checkpoint=checkpoint, vocab=vocab
    )
    out = out.reshape(lead)
    _check_out(out)
    return out


def token_entropy(
    logits: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Entropy -sum p log p of softmax(logits / temperature) per position, float32 ``[...]`` (nats)."""
    x = _logits(logits)
    vocab, lead = x.shape[-1], x.shape[:-1]
    inv_t = 1.0 / _temperature(temperature)
    if _use_fused(x):
        out = _fused_pair(x, torch.zeros(lead, dtype=torch.long, device=x.device), inv_t)[1]
        _check_out(out)
        return out

    def fn(rows: torch.Tensor) -> torch.Tensor:
        return _entropy(_log_softmax(rows, inv_t))

    (out,) = map_rows(fn, (x.reshape(-1, vocab),), chunk_size=chunk_size, checkpoint=checkpoint, vocab=vocab)
    out = out.reshape(lead)
    _check_out(out)
    return out


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ``token_logprobs`` and ``token_entropy`` in one pass over the logits."""
    x = _logits(logits)
    vocab, lead = x.shape[-1], x.shape[:-1]
    tok = _tokens(tokens, lead, vocab, x.device)
    inv_t = 1.0 / _temperature(temperature)
    if _use_fused(x):
        lp, ent = _fused_pair(x, tok, inv_t)
        _check_out(lp, ent)
        return lp, ent

    def fn(rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _lp_and_entropy(_log_softmax(rows, inv_t), ids)

    lp, ent = map_rows(
        fn, (x.reshape(-1, vocab), tok.reshape(-1)), chunk_size=chunk_size, checkpoint=checkpoint, vocab=vocab
    )
    lp, ent = lp.reshape(lead), ent.reshape(lead)
    _check_out(lp, ent)
    return lp, ent


def _head_params(head: nn.Module | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, torch.Tensor):
        return head, None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ShapeError(
            f"head must be a [V, H] weight tensor or a linear module with a 2-D .weight, got {type(head).__name__}"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    head: nn.Module | torch.Tensor,
    tokens: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    checkpoint: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) from hidden states ``[..., H]`` and an output head ``[V, H]``.

    ``head`` is the model's output embedding (``model.get_output_embeddings()``) or its weight.
    Logits are formed one chunk of rows at a time (``hidden_chunk @ W.T + b``), so with
    ``checkpoint=True`` neither forward nor backward holds more than one chunk of logits.
    Returns ``[...]`` float32, or ``(logprobs, entropy)`` when ``with_entropy``.
    """
    h = _checks.floating(hidden, "hidden")
    _checks.min_dims(h, "hidden", 2, "[..., T, H]")
    weight, bias = _head_params(head)
    if weight.shape[1] != h.shape[-1]:
        raise ShapeError(f"head weight has shape {tuple(weight.shape)} ([V, H]) but hidden size is {h.shape[-1]}")
    vocab, lead = weight.shape[0], h.shape[:-1]
    tok = _tokens(tokens, lead, vocab, h.device)
    inv_t = 1.0 / _temperature(temperature)

    def fn(rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = nn.functional.linear(rows, weight, bias)
        if with_entropy:
            return _lp_and_entropy(_log_softmax(logits, inv_t), ids)
        z = _scaled(logits, inv_t)
        return (z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1),)

    outs = map_rows(
        fn, (h.reshape(-1, h.shape[-1]), tok.reshape(-1)), chunk_size=chunk_size, checkpoint=checkpoint, vocab=vocab
    )
    shaped = tuple(o.reshape(lead) for o in outs)
    _check_out(*shaped)
    return shaped if with_entropy else shaped[0]  # type: ignore[return-value]


__all__ = [
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_logprobs_from_hidden",
]
