"""Pass@1 and Pass@k on a held-out split: sampling, verification, the unbiased estimator, and a
klcore metric component that logs them during training, in domain and out of domain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from klcore import hookimpl
from klcore.data import padding_id, score_completions
from klcore.errors import ConfigError
from klcore.rollout import pass_at_k, sample
from klcore.toy import encode_prompts, get_task
from klcore.toy.tasks import Problem, Task


def check_ks(ks: Sequence[int], samples: int) -> tuple[int, ...]:
    """``ks`` as a sorted tuple; each must be an int in ``1..samples`` (the unbiased estimator's range)."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"samples must be a positive int, got {samples!r}")
    out = tuple(sorted(set(ks)))
    if not out or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= samples for k in out):
        raise ConfigError(f"ks must be ints between 1 and samples = {samples}, got {list(ks)}; draw more samples "
                          "to estimate a larger k")
    return out


def mean_pass_at_k(correct: Sequence[int], samples: int, k: int) -> float:
    """Mean over problems of the unbiased pass@k, each problem with ``correct[i]`` of ``samples`` right."""
    if len(correct) == 0:
        raise ConfigError("need at least one problem to average pass@k over")
    return sum(pass_at_k(samples, int(c), k) for c in correct) / len(correct)


def distinct_problems(task: Task, n: int, *, split: str = "test", seed: int = 0) -> list[Problem]:
    """Up to ``n`` distinct problems of ``split``, without replacement: a dataset's first ``n`` items (file
    order), or a toy task's problems drawn with ``seed`` until ``n`` distinct ones (fewer when the split is
    smaller: 20 rounds of ``n`` draws find no more)."""
    items = getattr(task, "items", None)
    if callable(items):
        return list(items(split))[:n]
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, Problem] = {}
    for _ in range(20):
        for p in task.problems(n, generator=gen, split=split):
            if len(seen) < n:
                seen.setdefault(p.prompt, p)
        if len(seen) == n:
            break
    return list(seen.values())


@torch.no_grad()
def counts_on(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, problems: Sequence[Problem], *,
    samples: int = 16, temperature: float = 1.0, seed: int = 0,
) -> list[int]:
    """Number of correct completions (reward >= 1) among ``samples`` sampled for each of ``problems``."""
    if not problems:
        raise ConfigError("need at least one problem to evaluate")
    gen = torch.Generator().manual_seed(seed)
    roll = sample(
        model, encode_prompts(tokenizer, problems), group_size=samples, max_new_tokens=task.max_answer_chars + 2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=padding_id(tokenizer), temperature=temperature,
        generator=gen,
    )
    texts = tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
    rewards = score_completions(task, [problems[i // samples] for i in range(len(texts))], texts)
    return [sum(r >= 1.0 for r in rewards[i * samples : (i + 1) * samples]) for i in range(len(problems))]


def correct_counts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    problems: int = 64,
    samples: int = 16,
    temperature: float = 1.0,
    split: str = "test",
    seed: int = 0,
) -> list[int]:
    """Number of correct completions among ``samples`` sampled for each of up to ``problems`` distinct
    problems of ``split`` (:func:`distinct_problems`)."""
    drawn = distinct_problems(task, problems, split=split, seed=seed)
    return counts_on(model, tokenizer, task, drawn, samples=samples, temperature=temperature, seed=seed)


def pass_at_ks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    ks: Sequence[int] = (1, 16),
    problems: int = 64,
    samples: int = 16,
    temperature: float = 1.0,
    split: str = "test",
    seed: int = 0,
) -> dict[int, float]:
    """``{k: mean pass@k}`` on ``problems`` problems of ``split`` from ``samples`` samples each."""
    ks = check_ks(ks, samples)
    counts = correct_counts(model, tokenizer, task, problems=problems, samples=samples, temperature=temperature,
                            split=split, seed=seed)
    return {k: mean_pass_at_k(counts, samples, k) for k in ks}


class PassAtKMetric:
    """Metric component ``pass_at_k``: logs ``eval/<task>_pass_at_<k>`` for the trainer's task (its
    held-out ``test`` split) and ``eval/ood_<task>_pass_at_<k>`` for the out-of-domain task, after
    the update of step 0, every ``every`` steps, and after the last step (``every = 0``: first and
    last only). The value logged at step s is measured after s + 1 updates."""

    def __init__(
        self,
        *,
        every: int = 25,
        ks: Sequence[int] = (1, 16),
        problems: int = 64,
        samples: int = 16,
        temperature: float = 1.0,
        seed: int = 1234,
        ood_task: str = "",
        ood_task_options: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(f"every must be an int >= 0, got {every!r}")
        if not isinstance(problems, int) or problems < 1:
            raise ConfigError(f"problems must be a positive int, got {problems!r}")
        if not float(temperature) > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        self.every, self.ks, self.problems, self.samples = every, check_ks(ks, samples), problems, samples
        self.temperature, self.seed = float(temperature), seed
        self.ood = get_task(ood_task, **(ood_task_options or {})) if ood_task else None

    def evaluate(self, trainer: Any) -> dict[str, float]:
        tasks = {trainer.task.name: trainer.task}
        if self.ood is not None:
            tasks[f"ood_{self.ood.name}"] = self.ood
        out: dict[str, float] = {}
        for name, task in tasks.items():
            values = pass_at_ks(trainer.unwrapped_model, trainer.tokenizer, task, ks=self.ks, problems=self.problems,
                                samples=self.samples, temperature=self.temperature, seed=self.seed)
            out.update({f"eval/{name}_pass_at_{k}": v for k, v in values.items()})
        return out

    @hookimpl
    def klcore_step_end(self, trainer: Any, step: int) -> dict[str, float] | None:
        last = step == trainer.config.steps - 1
        if step == 0 or last or (self.every and step % self.every == 0):
            return self.evaluate(trainer)
        return None


__all__ = ["PassAtKMetric", "check_ks", "correct_counts", "counts_on", "distinct_problems", "mean_pass_at_k",
           "pass_at_ks"]
