"""``DistillTrainer``: on-policy distillation of a Hugging Face causal LM on a verifiable text task.

Loop per step: (re-)estimate PACED pass rates when due, draw problems from the pool, sample G
student completions per problem, score every generated position with the frozen teacher, one
update with the configured objective, weighted per problem. Runs on klcore's accelerate loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from klcore.data import padding_id
from klcore.errors import CheckpointError, DataError, UnsupportedModelError, VocabMismatchError
from klcore.logprobs import token_logprobs
from klcore.plugins import Plugins
from klcore.rollout import forward_accepts, sample
from klcore.toy.tasks import Task
from klcore.toy.warmup import encode_prompts, evaluate
from klcore.trainer.base import Batch, Metrics, step_seed
from opd_distill._loop import DistillLoop
from opd_distill.config import DistillConfig
from opd_distill.objectives import check_vocab
from opd_distill.paced import estimate_pass_rates


def output_vocab(model: nn.Module) -> int:
    """Rows of the model's output head (the vocabulary its logits cover)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None or not hasattr(head, "weight"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no output embedding; DistillTrainer needs a causal LM with an lm_head"
        )
    return int(head.weight.shape[0])


def response_logits(model: nn.Module, batch: Mapping[str, torch.Tensor], vocab: int = 0) -> torch.Tensor:
    """``[rows, R, V]`` logits predicting the batch's ``tokens`` (the last R + 1 positions only); with
    ``vocab`` > 0 only the first ``vocab`` head rows (a padded head sliced to the tokenizer)."""
    r = batch["tokens"].shape[1]
    kwargs: dict[str, Any] = {"logits_to_keep": r + 1} if forward_accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **kwargs,
    )
    logits = out.logits[:, -(r + 1) : -1]
    return logits[..., :vocab] if vocab else logits


def check_tokenizers(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise ``VocabMismatchError`` unless both tokenizers map the same strings to the same ids."""
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    if mine == theirs:
        return
    differ = sorted(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
    examples = ", ".join(f"{t!r}: {mine.get(t)} vs {theirs.get(t)}" for t in differ[:3])
    raise VocabMismatchError(
        f"the student's and the teacher's tokenizers differ on {len(differ)} tokens (student vs teacher id: "
        f"{examples}); token-level distillation compares both distributions id by id, so use a teacher with "
        "the student's tokenizer"
    )


class DistillTrainer(DistillLoop):
    """Distil ``teacher`` (frozen) into ``model`` on ``task``'s problems, on the student's samples.

    ``task`` provides ``problems(n, generator=, split=)``, ``verify(problem, completion)`` and
    ``max_answer_chars`` (see ``klcore.toy.Task``). ``eval_tasks`` are evaluated greedily on their
    ``test`` split (``eval/<name>_pass@1``). Student and teacher must share the vocabulary: with
    ``teacher_tokenizer`` the two tokenizers are compared id by id (``check_tokenizers``); heads padded to
    different sizes need ``config.slice_vocab``.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        config: DistillConfig,
        *,
        run_dir: str | Path,
        eval_tasks: Mapping[str, Task] | None = None,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        plugins: Plugins | None = None,
        accelerator: Accelerator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if teacher_tokenizer is not None:
            check_tokenizers(tokenizer, teacher_tokenizer)
        #: logits sliced to the tokenizer's vocabulary (padded heads), or 0: the heads as they are
        self.vocab = len(tokenizer) if config.slice_vocab else 0
        heads = output_vocab(model), output_vocab(teacher)
        if self.vocab and min(heads) < self.vocab:
            raise VocabMismatchError(
                f"slice_vocab=True keeps the tokenizer's {self.vocab} tokens, but the output heads have {heads[0]} "
                f"(student) and {heads[1]} (teacher) rows; both must cover the tokenizer"
            )
        if not self.vocab:
            check_vocab(*heads, tokenizer_vocab=len(tokenizer))
        if config.disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        super().__init__(model, config, run_dir=run_dir, plugins=plugins, accelerator=accelerator, optimizer=optimizer)
        self.config: DistillConfig = config
        self.teacher = teacher.eval().requires_grad_(False).to(self.accelerator.device)
        self.tokenizer = tokenizer
        self.task = task
        self.eval_tasks = dict(eval_tasks or {})
        self.max_new_tokens = config.max_new_tokens or task.max_answer_chars + 2
        self.pool = task.problems(
            config.problem_pool, generator=torch.Generator().manual_seed(config.seed), split="train"
        )
        self.pass_rates = torch.full((len(self.pool),), 0.5)  # replaced by estimates when weighting is on
        self._warned_zero_weights = False

    def extra_state(self) -> dict[str, Any]:
        """The pool's pass rates: a resumed run weights its problems as the uninterrupted one does."""
        return {"pass_rates": self.pass_rates.clone()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        rates = state.get("pass_rates")
        if not isinstance(rates, torch.Tensor) or rates.shape != self.pass_rates.shape:
            raise CheckpointError(
                f"the checkpoint's PACED pass rates are {getattr(rates, 'shape', rates)!r} but this run's pool holds "
                f"{len(self.pool)} problems; resume with the config that wrote the checkpoint (problem_pool, seed)"
            )
        self.pass_rates = rates.float()

    def _sample(self, problems: list, group: int, gen: torch.Generator, model: nn.Module | None = None):
        tok = self.tokenizer
        return sample(
            model if model is not None else self.unwrapped_model,
            encode_prompts(tok, problems),
            group_size=group,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=padding_id(tok),
            temperature=self.config.temperature,
            generator=gen,
        )

    def _verify(self, problems: list, responses: torch.Tensor, group: int) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return torch.tensor([self.task.verify(problems[i // group], t) for i, t in enumerate(texts)]).view(-1, group)

    def estimate_pass_rates(self, gen: torch.Generator) -> torch.Tensor:
        """Pass rate of every pool problem from K = ``paced.samples`` sampled student answers, ``[pool]``."""
        k = self.config.paced.samples
        rates = []
        per_call = max(1, 1024 // k)
        for start in range(0, len(self.pool), per_call):
            part = self.pool[start : start + per_call]
            roll = self._sample(part, k, gen)
            rates.append(estimate_pass_rates(self._verify(part, roll.responses, k)))
        return torch.cat(rates)

    def collect(self, step: int) -> tuple[Batch, Metrics]:
        cfg, acc = self.config, self.accelerator
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step) + acc.process_index)
        metrics: Metrics = {}
        if cfg.paced.due(step):
            self.pass_rates = self.estimate_pass_rates(gen)
            metrics["paced/pool_pass_rate"] = float(self.pass_rates.mean())
            metrics["paced/pool_unsolved"] = float((self.pass_rates == 0).float().mean())
            metrics["paced/pool_solved"] = float((self.pass_rates == 1).float().mean())
        idx = torch.randint(len(self.pool), (cfg.prompts_per_step,), generator=gen)
        problems = [self.pool[int(i)] for i in idx]
        g = cfg.group_size
        teacher_writes = step < cfg.teacher_rollout_steps
        roll = self._sample(problems, g, gen, self.teacher if teacher_writes else None)
        if self.vocab and bool((roll.responses[roll.response_mask] >= self.vocab).any()):
            raise DataError(
                f"a sampled token id is >= {self.vocab}, a padding row of the output head that slice_vocab=True "
                "drops; the sampling model puts mass on padding rows, so distil with heads of equal size instead"
            )
        success = self._verify(problems, roll.responses, g)
        weights = cfg.paced.weights(self.pass_rates[idx]).repeat_interleave(g)
        all_zero = cfg.paced.weighting != "none" and not bool((weights > 0).any())
        if all_zero and not self._warned_zero_weights:
            self._warned_zero_weights = True
            warnings.warn(
                f"step {step}: every PACED weight of the batch is 0 (weighting={cfg.paced.weighting!r}: every drawn "
                "problem has pass rate 0 or 1), so the loss and its gradient are 0; metric paced/all_weights_zero "
                "counts such steps. A warmer student, more samples per pass rate or weighting='none' gives signal",
                stacklevel=2,
            )
        batch: Batch = {
            "input_ids": roll.input_ids,
            "attention_mask": roll.attention_mask,
            "position_ids": roll.position_ids,
            "tokens": roll.responses,
            "response_mask": roll.response_mask,
            "weights": weights.to(roll.input_ids.device),
        }
        with torch.no_grad():
            batch["teacher_logits"] = response_logits(self.teacher, batch, self.vocab)
            student = response_logits(self.model, batch, self.vocab)
            safe = torch.where(roll.response_mask, roll.responses, torch.zeros_like(roll.responses))
            batch["old_log_prob"] = token_logprobs(student, safe, chunk_size=cfg.chunk_size or None)
            metrics.update(self.state_metrics(student, batch["teacher_logits"], roll.response_mask))
        metrics.update(
            {
                "success/mean": float(success.mean()),  # of the teacher's completions while it writes them
            "rollout/teacher_samples": float(teacher_writes),
                "paced/weight_mean": float(weights.mean()),
                "paced/weight_zero_frac": float((weights == 0).float().mean()),
                "paced/weight_max": float(weights.max()),
                "paced/all_weights_zero": float(all_zero),
                "response/length_mean": float(roll.response_mask.sum(1).float().mean()),
                **getattr(self.task, "metrics", {}),  # a prompt dataset's dropped-row counts (data/*)
            }
        )
        if cfg.paced.weighting != "none":
            metrics["paced/batch_pass_rate"] = float(self.pass_rates[idx].mean())
        return batch, metrics

    def student_logits(self, batch: Batch) -> torch.Tensor:
        return response_logits(self.model, batch, self.vocab)

    def evaluate(self) -> Metrics:
        """Greedy pass@1 on each eval task's held-out ``test`` split."""
        model, cfg = self.unwrapped_model, self.config
        return {
            f"eval/{name}_pass@1": evaluate(model, self.tokenizer, task, n=cfg.eval_problems, seed=cfg.seed + 99)
            for name, task in self.eval_tasks.items()
        }


__all__ = ["DistillTrainer", "check_tokenizers", "output_vocab", "response_logits"]
