"""Sampling groups of completions from a Hugging Face causal LM, and the unbiased pass@k estimator.

``sample`` runs its own decode loop on the model's KV cache (any ``AutoModelForCausalLM`` that
accepts ``past_key_values``, ``attention_mask`` and ``position_ids``), so the behaviour log-probs it
returns are exactly those of the distribution it sampled from before top-p truncation:
log softmax(logits / temperature) at the drawn token (the quantity a trainer recomputes).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from klcore.errors import ConfigError, DataError, ShapeError, UnsupportedModelError


@dataclass
class Rollout:
    """Completions of ``N = prompts x group_size`` samples (rows grouped by prompt).

    ``input_ids``/``attention_mask``: ``[N, P + R]``: left-padded prompt then response, padded on the
    right after EOS. ``response_mask``: ``[N, R]`` bool, True for generated tokens up to and including
    the first EOS. ``logprobs``: ``[N, R]`` float32 behaviour log-probs (0 outside the mask).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_length: int
    group_size: int

    @property
    def responses(self) -> torch.Tensor:
        """``[N, R]`` generated token ids (pad after EOS)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def position_ids(self) -> torch.Tensor:
        """``[N, P + R]`` positions counting only attended tokens (left padding gets 0)."""
        return position_ids(self.attention_mask)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions for a left-padded batch: cumulative count of attended tokens minus one, floored at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists into ``(ids [N, P], attention_mask [N, P])``."""
    if len(sequences) == 0 or any(len(s) == 0 for s in sequences):
        raise DataError("every prompt must hold at least one token, and at least one prompt is needed")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the smallest set with cumulative probability >= top_p to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keeps at least the top token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` (of the wrapped module under DDP, of the base model under a peft adapter,
    which passes keywords through) takes keyword ``name``; looked up once per model class."""
    inner: nn.Module = getattr(model, "module", model)
    base_of = getattr(inner, "get_base_model", None)
    if callable(base_of):
        inner = base_of()
    cls = type(inner)
    if cls not in _FORWARD_PARAMS:
        _FORWARD_PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return name in _FORWARD_PARAMS[cls]


def _cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model`` takes and returns its KV cache (transformers 5 renamed it)."""
    if forward_accepts(model, "cache"):
        return "cache"
    if forward_accepts(model, "past_key_values"):
        return "past_key_values"
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; "
        "sample() needs a Hugging Face causal LM with a KV cache"
    )


#: Vocabulary block of the two-stage inverse-CDF draw.
DRAW_BLOCK = 1024


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` ``[n, V]`` by inverse CDF; the uniforms come from ``generator``
    on its own device (a CPU generator works for a CUDA model, and draws do not depend on the device).

    Two stages, both accumulated in float64 so tiny probabilities keep their share of the interval:
    the block of ``DRAW_BLOCK`` tokens holding the uniform's point, then the token inside it. The same
    token as one float64 cumsum over the whole vocabulary, up to rounding, at a fraction of the cost
    (vocabularies up to ``4 * DRAW_BLOCK`` are one block).
    """
    device = generator.device if generator is not None else probs.device
    u = torch.rand((probs.shape[0], 1), generator=generator, device=device).to(probs.device).double()
    n, vocab = probs.shape
    if vocab <= 4 * DRAW_BLOCK:  # one block: the plain float64 inverse CDF
        cdf = probs.double().cumsum(-1)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        return torch.minimum(tok, vocab - 1 - (probs > 0).flip(-1).int().argmax(-1))
    width = DRAW_BLOCK
    blocks = -(-vocab // width)
    padded = torch.nn.functional.pad(probs, (0, blocks * width - vocab)).view(n, blocks, width)
    block_cdf = padded.sum(-1, dtype=torch.float64).cumsum(-1)  # [n, blocks]
    target = u * block_cdf[:, -1:]
    last_block = blocks - 1 - (block_cdf.diff(dim=-1, prepend=block_cdf.new_zeros(n, 1)) > 0).flip(-1).int().argmax(-1)
    block = torch.minimum(torch.searchsorted(block_cdf, target, right=True).squeeze(-1), last_block)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    inside = padded.gather(1, block[:, None, None].expand(n, 1, width)).squeeze(1)  # [n, width]
    inside_cdf = inside.double().cumsum(-1)
    offset = torch.searchsorted(inside_cdf, (target.squeeze(-1) - before)[:, None], right=True).squeeze(-1)
    last_positive = width - 1 - (inside > 0).flip(-1).int().argmax(-1)
    return block * width + torch.minimum(offset, last_positive)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int = 1,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    synced: bool | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for every prompt (token-id lists) with the KV cache.

    Sampling draws from softmax(logits / temperature) restricted to the top-p nucleus; ``greedy``
    takes the argmax instead. Generation of a row stops at its first ``eos_token_id``; the loop ends
    when every row has stopped or after ``max_new_tokens``. ``generator`` makes draws reproducible.
    ``synced``: the loop ends only when every process's rows have stopped (one all-reduce per token),
    which sharded models need (each forward gathers parameters collectively); default: on when the
    model's parameters are sharded over processes (FSDP2, DeepSpeed ZeRO-3). Rows that stopped early
    get padding outside ``response_mask``, so the result is the same as unsynced up to that padding.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not greedy and not float(temperature) > 0:
        raise ConfigError(f"temperature must be > 0 when sampling (use greedy=True for argmax), got {temperature}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    synced = is_sharded(model) if synced is None else synced
    unique_ids, unique_attn = left_pad([list(p) for p in prompts], pad_token_id)
    unique_ids, unique_attn = unique_ids.to(device), unique_attn.to(device)
    ids, attn = unique_ids.repeat_interleave(group_size, 0), unique_attn.repeat_interleave(group_size, 0)
    n, prompt_len = ids.shape
    cache_arg = _cache_argument(model)
    keep = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    was_training = model.training
    model.eval()
    try:
        # each prompt is prefilled once; its cache and last logits are repeated for its group
        out = model(
            input_ids=unique_ids, attention_mask=unique_attn, position_ids=position_ids(unique_attn), use_cache=True,
            **keep,
        )
        cache = _repeat_cache(out[cache_arg], group_size)
        next_logits = out.logits[:, -1].repeat_interleave(group_size, 0)
        pos = position_ids(attn)[:, -1]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        tokens: list[torch.Tensor] = []
        logps: list[torch.Tensor] = []
        alive: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            scaled = next_logits.float() / (1.0 if greedy else float(temperature))
            logp = torch.log_softmax(scaled, dim=-1)
            if greedy:
                tok = scaled.argmax(-1)
            elif top_p >= 1.0:
                tok = _draw(logp.exp(), generator)
            else:
                tok = _draw(torch.softmax(_top_p_filter(scaled, float(top_p)), dim=-1), generator)
            tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
            tokens.append(tok)
            logps.append(torch.where(done, torch.zeros_like(logp[:, 0]), logp.gather(-1, tok[:, None]).squeeze(-1)))
            alive.append(~done)
            done = done | (tok == eos_token_id)
            if _all_stopped(done, synced):
                break
            attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
            pos = pos + 1
            out = model(
                input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None],
                use_cache=True, **{cache_arg: cache},
            )
            cache = out[cache_arg]
            next_logits = out.logits[:, -1]
    finally:
        model.train(was_training)
    response = torch.stack(tokens, dim=1)
    response_mask = torch.stack(alive, dim=1)
    full = torch.cat([ids[:, :prompt_len], response], dim=1)
    full_attn = torch.cat([attn[:, :prompt_len], response_mask.long()], dim=1)
    return Rollout(
        input_ids=full,
        attention_mask=full_attn,
        response_mask=response_mask,
        logprobs=torch.stack(logps, dim=1),
        prompt_length=prompt_len,
        group_size=group_size,
    )


def _repeat_cache(cache: object, repeats: int) -> object:
    """A KV cache with each row repeated ``repeats`` times (rows grouped), in place where the cache allows."""
    if repeats == 1:
        return cache
    repeat = getattr(cache, "batch_repeat_interleave", None)
    if callable(repeat):
        repeat(repeats)
        return cache
    if isinstance(cache, tuple):  # legacy tuples of (key, value) per layer, batch first
        return tuple(tuple(t.repeat_interleave(repeats, 0) for t in layer) for layer in cache)
    raise UnsupportedModelError(
        f"cannot repeat a {type(cache).__name__} KV cache for a group of samples; "
        "use a model whose cache has batch_repeat_interleave (transformers' Cache classes)"
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded over processes (FSDP2 DTensors, DeepSpeed ZeRO-3)."""
    first = next(model.parameters(), None)
    return isinstance(first, DTensor) or hasattr(first, "ds_id")


def _all_stopped(done: torch.Tensor, synced: bool) -> bool:
    """Every row stopped, on this process or (``synced``) on every process."""
    running = (~done).sum()
    if synced and dist.is_available() and dist.is_initialized():
        dist.all_reduce(running)
    return int(running) == 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which is exact and stable for large n.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name} must be an int, got {v!r}")
    if n < 1 or not 0 <= c <= n:
        raise ShapeError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ShapeError(f"k must be between 1 and the number of samples n={n}, got k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


__all__ = ["Rollout", "forward_accepts", "is_sharded", "left_pad", "pass_at_k", "position_ids", "sample"]
