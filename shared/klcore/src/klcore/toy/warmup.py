"""Short supervised warm-up on a toy task, and greedy/sampled accuracy evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from klcore.errors import ConfigError
from klcore.rollout import sample
from klcore.toy.tasks import Problem, Task


def encode_prompts(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> list[list[int]]:
    """Token ids of each problem's prompt (``klcore.data.encode_prompt``): a dataset prompt's own encoding
    (chat template included), else the text with the tokenizer's own special tokens (a BOS only where
    the tokenizer adds one)."""
    from klcore.data import encode_prompt  # klcore.data imports the toy tasks

    return [encode_prompt(tokenizer, p) for p in problems]


def _sft_batch(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt answer <eos>`` with labels only on ``answer <eos>``."""
    from klcore.data import padding_id

    rows, labels = [], []
    for p, prompt in zip(problems, encode_prompts(tokenizer, problems), strict=True):
        answer = [*tokenizer.encode(p.answer, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), padding_id(tokenizer), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)], lab[i, : len(label)], attn[i, : len(row)] = torch.tensor(row), torch.tensor(label), 1
    return ids, attn, lab


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    n: int = 128,
    split: str = "test",
    seed: int = 1234,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 0,
) -> float:
    """Mean reward of ``n`` problems of ``split`` (greedy decoding by default): drawn from a toy task, the
    first ``n`` distinct items of a dataset task (one with ``items(split)``). ``max_new_tokens = 0``: the
    task's longest answer plus two."""
    from klcore.data import padding_id, score_completions

    gen = torch.Generator().manual_seed(seed)
    items = getattr(task, "items", None)
    problems = items(split)[:n] if callable(items) else task.problems(n, generator=gen, split=split)
    roll = sample(
        model, encode_prompts(tokenizer, problems), max_new_tokens=max_new_tokens or task.max_answer_chars + 2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=padding_id(tokenizer),
        greedy=greedy, temperature=temperature, generator=gen,
    )
    texts = tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
    return sum(score_completions(task, problems, texts)) / len(problems)


@dataclass
class WarmupResult:
    """Loss per step and the held-out greedy accuracy after the warm-up."""

    losses: list[float] = field(default_factory=list)
    accuracy: float = 0.0


def warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    eval_problems: int = 128,
) -> WarmupResult:
    """Supervised fine-tuning on ``steps`` batches of training problems (cross-entropy on answers).

    Short on purpose: it leaves a policy that is sometimes right, so RL has signal to work with.
    """
    if steps < 0 or batch_size < 1:
        raise ConfigError(f"need steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / max(steps, 1)))
    result = WarmupResult()
    model.train()
    for _ in range(steps):
        ids, attn, lab = (t.to(device) for t in _sft_batch(tokenizer, task.problems(batch_size, generator=gen)))
        loss = model(input_ids=ids, attention_mask=attn, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        result.losses.append(loss.detach().item())
    result.accuracy = evaluate(model, tokenizer, task, n=eval_problems, seed=seed + 1) if eval_problems else 0.0
    return result
