"""DPH-RL inside a klcore trainer: the ``dph`` regulariser, the ``rehearsal_divergence`` metric and
the exploration-set task.

The regulariser adds ``eta * token-mean f(exp(log pi_theta - stored log pi_ref))`` (``additive``
weighting), or that times ``R / N`` (``rows``, the reference code's scale: R rehearsal rows, N online rows
of the optimiser step) on a rehearsal batch to every optimiser step through ``klcore_extra_loss``, with its own forward pass of the policy
on stored responses: no reference model is loaded or called. The step's rehearsal rows are spread
over the trainer's micro-batches (each adds its share, normalised by the whole rehearsal batch's
token count), so every micro-batch is mixed: its online rows get the policy loss from the trainer,
its rehearsal rows the f-divergence from here, each over its own tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from divergence_rl.generators import check_alpha, check_kind, f_values
from divergence_rl.losses import check_eta, check_weighting, rehearsal_loss
from divergence_rl.presampling import model_fingerprint, training_prompts
from divergence_rl.store import RehearsalSet, SelectionRule, load_rehearsal
from klcore import hookimpl
from klcore.data import score_completions
from klcore.errors import ConfigError, DataError, VocabMismatchError
from klcore.reduce import GlobalCounts, global_counts
from klcore.toy.tasks import Problem, Task
from klcore.trainer.base import step_seed
from klcore.trainer.grpo import policy_forward


def _rule(options: Mapping[str, Any] | None) -> SelectionRule | None:
    return SelectionRule(**options) if options else None


def check_compatible(rehearsal: RehearsalSet, trainer: Any, *, check_model: bool = True) -> None:
    """Raise unless the trainer's model and temperature match those the store was sampled with.

    ``VocabMismatchError`` for another vocabulary size, ``ConfigError`` for another temperature, and, when
    ``check_model`` and the run starts at step 0 (a resumed run's weights have moved on), ``DataError`` when
    the model's :func:`~divergence_rl.model_fingerprint` differs from the store's: the store's log-probs then
    belong to another initial policy.
    """
    vocab = getattr(getattr(trainer.unwrapped_model, "config", None), "vocab_size", None)
    if vocab != rehearsal.manifest["vocab_size"]:
        raise VocabMismatchError(f"the rehearsal store was sampled from a model with vocabulary size "
                                 f"{rehearsal.manifest['vocab_size']} but the trained model has {vocab}; pre-sample "
                                 "again from the initial policy of this run")
    temperature = getattr(trainer.config, "temperature", 1.0)
    if float(temperature) != float(rehearsal.manifest["temperature"]):
        raise ConfigError(f"the stored log-probs are at temperature {rehearsal.manifest['temperature']} but the trainer "
                          f"computes log-probs at {temperature}; use the same temperature for both")
    if not check_model or getattr(trainer, "step", 0) != 0:
        return
    stored, this = rehearsal.manifest["model_fingerprint"], model_fingerprint(trainer.unwrapped_model)
    if stored != this:
        raise DataError(f"the rehearsal store was pre-sampled from another initial policy (weights fingerprint "
                        f"{stored}; this run starts from {this}): its log-probs are not this policy's, so the "
                        "divergence would pull towards another model. Pre-sample again from this run's initial "
                        "policy, or set check_model = false to use the store anyway")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _rows(batch: Mapping[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v[index].to(device) for k, v in batch.items()}


class DPHRegulariser:
    """Regulariser ``dph``: the DPH-RL rehearsal term added to any policy loss.

    Options: ``path`` (the pre-sampled store), ``kind`` (a generator of ``KINDS``; DPH-JS is ``js``,
    DPH-F ``forward_kl``), ``eta``, ``weighting`` (``rows``, default: the reference code's effective
    weighting, ``eta * (R / N) * D`` with R rehearsal rows and N online rows per optimiser step, which is
    the reference's ``(1 - p) L_exp + p eta D`` times the constant ``1 / (1 - p)``; ``additive``:
    ``eta * D``), ``alpha``, ``batch_size``
    (rehearsal rows per optimiser step; 0: all), ``seed``, and ``rule`` (a table of
    ``SelectionRule`` fields; default: the store's), ``check_model`` (default true: refuse, at step 0, a
    store pre-sampled from another initial policy; see :func:`check_compatible`). Logs ``dph/loss`` (eta
    times the divergence).
    """

    def __init__(
        self,
        *,
        path: str,
        kind: str = "js",
        eta: float = 0.2,
        weighting: str = "rows",
        alpha: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
        rule: Mapping[str, Any] | None = None,
        check_model: bool = True,
    ) -> None:
        check_kind(kind)
        if kind == "alpha":
            check_alpha(alpha)
        eta = check_eta(eta)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ConfigError(f"batch_size must be an int >= 0 (0: every rehearsal row), got {batch_size!r}")
        self.kind, self.eta, self.alpha, self.batch_size, self.seed = kind, float(eta), float(alpha), batch_size, seed
        self.check_model = _flag("check_model", check_model)
        self.weighting = check_weighting(weighting)
        self.rehearsal = load_rehearsal(Path(path), _rule(rule))
        self._step_rows: torch.Tensor | None = None
        self._counts: GlobalCounts | None = None
        self._updates = 0

    @hookimpl
    def klcore_train_start(self, trainer: Any) -> None:
        check_compatible(self.rehearsal, trainer, check_model=self.check_model)

    def draw(self, trainer: Any) -> torch.Tensor:
        """Row indices of this optimiser step's rehearsal batch (reproducible from seed, step, update)."""
        n = len(self.rehearsal)
        gen = torch.Generator().manual_seed(
            step_seed(self.seed, trainer.step) + 7_919 * self._updates + 104_729 * trainer.accelerator.process_index
        )
        self._updates += 1
        order = torch.randperm(n, generator=gen)
        return order if self.batch_size == 0 or self.batch_size >= n else order[: self.batch_size]

    def rows_ratio(self, online: GlobalCounts) -> float:
        """``R / N = p / (1 - p)``: this step's rehearsal rows over the optimiser step's online rows (both global
        over processes, rows with a valid token)."""
        if self._counts is None:
            raise ConfigError("rows_ratio needs this step's rehearsal batch: call it from klcore_extra_loss")
        return self._counts.sequences / online.sequences

    @hookimpl
    def klcore_step_start(self) -> None:
        self._updates = 0

    @hookimpl
    def klcore_extra_loss(
        self, trainer: Any, counts: GlobalCounts, micro_index: int, micro_count: int
    ) -> dict[str, torch.Tensor] | None:
        device = trainer.accelerator.device
        if micro_index == 0 or self._step_rows is None or self._counts is None:
            self._step_rows = self.draw(trainer)
            mask = self.rehearsal.batch["response_mask"][self._step_rows].to(device)
            self._counts = global_counts(mask, accelerator=trainer.accelerator)
        part = torch.tensor_split(self._step_rows, micro_count)[micro_index]
        if part.numel() == 0:
            return None
        batch = _rows(self.rehearsal.batch, part, device)
        log_prob, _ = policy_forward(trainer.model, batch, getattr(trainer.config, "temperature", 1.0))
        eta = self.eta * self.rows_ratio(counts) if self.weighting == "rows" else self.eta
        loss, _ = rehearsal_loss(log_prob, batch["ref_log_prob"], batch["response_mask"], kind=self.kind, eta=eta,
                                 alpha=self.alpha, counts=self._counts)
        return {"dph/loss": loss}


class RehearsalDivergenceMetric:
    """Metric ``rehearsal_divergence``: logs ``rehearsal/<kind>`` = token-mean f over the first
    ``rows`` rehearsal rows under the current policy (no gradient), for each of ``kinds``, after the
    update of step 0, every ``every`` steps and after the last step; comparable across methods.
    ``check_model`` as for the ``dph`` regulariser."""

    def __init__(
        self,
        *,
        path: str,
        kinds: tuple[str, ...] | list[str] = ("forward_kl", "js"),
        alpha: float = 0.2,
        rows: int = 128,
        every: int = 10,
        rule: Mapping[str, Any] | None = None,
        check_model: bool = True,
    ) -> None:
        self.kinds = tuple(check_kind(k) for k in kinds)
        if not self.kinds:
            raise ConfigError("kinds must name at least one generator")
        if "alpha" in self.kinds:
            check_alpha(alpha)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or isinstance(every, bool) or every < 0:
            raise ConfigError(f"need rows >= 1 and every >= 0, got rows={rows!r}, every={every!r}")
        self.alpha, self.every = float(alpha), every
        self.check_model = _flag("check_model", check_model)
        rehearsal = load_rehearsal(Path(path), _rule(rule))
        self.rehearsal = rehearsal
        self.index = torch.arange(min(rows, len(rehearsal)))

    @hookimpl
    def klcore_train_start(self, trainer: Any) -> None:
        check_compatible(self.rehearsal, trainer, check_model=self.check_model)

    @torch.no_grad()
    def measure(self, trainer: Any) -> dict[str, float]:
        batch = _rows(self.rehearsal.batch, self.index, trainer.accelerator.device)
        model = trainer.unwrapped_model
        was_training = model.training
        model.eval()
        try:
            log_prob, _ = policy_forward(model, batch, getattr(trainer.config, "temperature", 1.0))
        finally:
            model.train(was_training)
        mask = batch["response_mask"].bool()
        ratio = torch.where(mask, log_prob - batch["ref_log_prob"], torch.zeros_like(log_prob))
        return {f"rehearsal/{k}": float((f_values(ratio, k, alpha=self.alpha) * mask).sum() / mask.sum())
                for k in self.kinds}

    @hookimpl
    def klcore_step_end(self, trainer: Any, step: int) -> dict[str, float] | None:
        if step == 0 or step == trainer.config.steps - 1 or (self.every and step % self.every == 0):
            return self.measure(trainer)
        return None


@dataclass
class ExplorationTask:
    """``task`` whose ``train`` split is the exploration set ``problems`` (drawn uniformly with
    replacement); ``test``, scoring and data metrics are the base task's. Train DPH-RL's online part on
    it. :meth:`from_store` builds it from a rehearsal store, with a dataset's own encoded prompts."""

    task: Task
    problems_list: tuple[Problem, ...]
    name: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.problems_list:
            raise ConfigError("the exploration set is empty: every training prompt is in the rehearsal set; "
                              "tighten the selection rule or sample more prompts")
        self.name = self.task.name

    @classmethod
    def from_store(cls, task: Task, rehearsal: RehearsalSet) -> ExplorationTask:
        """The exploration set of ``rehearsal`` as ``task``'s own problems. For a prompt dataset these are its
        ``klcore.data.Prompt`` rows (encoded ids, chat template and reward fields included), matched by
        position with the store's prompts; ``DataError`` if the dataset's training prompts (their text and
        answer, and the token ids of every stored response's prompt) are not the ones the store was sampled
        from."""
        stored = rehearsal.manifest["prompts"]
        if not hasattr(task, "items"):
            return cls(task, tuple(rehearsal.exploration))
        pool = training_prompts(task, len(stored), 0)
        found = [[p.prompt, p.answer] for p in pool]
        if found != [list(p) for p in stored]:
            first = next((i for i, (a, b) in enumerate(zip(found, stored, strict=False)) if a != list(b)),
                         min(len(found), len(stored)))
            raise DataError(f"the training prompts of {task.name!r} differ from those the store was pre-sampled from "
                            f"(first at position {first}; {len(found)} here, {len(stored)} stored): load the same "
                            "data with the same split, or pre-sample again")
        for row, owner in enumerate(rehearsal.row_prompt_index):
            ids = list(getattr(pool[owner], "ids", ()))
            if ids and ids != rehearsal.prompt_ids(row):
                raise DataError(f"prompt {owner} of {task.name!r} ({pool[owner].prompt[:40]!r}) encodes to other tokens "
                                "than the store's (another chat template, system prompt or tokenizer?): load the data "
                                "as it was pre-sampled, or pre-sample again")
        return cls(task, tuple(pool[i] for i in rehearsal.exploration_index))

    @property
    def max_answer_chars(self) -> int:
        return self.task.max_answer_chars

    @property
    def metrics(self) -> dict[str, float]:
        return dict(getattr(self.task, "metrics", {}))

    def problems(self, n: int, *, generator: torch.Generator, split: str = "train") -> list[Problem]:
        if split != "train":
            return self.task.problems(n, generator=generator, split=split)
        index = torch.randint(len(self.problems_list), (n,), generator=generator).tolist()
        return [self.problems_list[i] for i in index]

    def verify(self, problem: Problem, completion: str) -> float:
        return self.task.verify(problem, completion)

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        """The base task's rewards (one batch call for a dataset's reward)."""
        return score_completions(self.task, problems, completions)


__all__ = ["DPHRegulariser", "ExplorationTask", "RehearsalDivergenceMetric", "check_compatible"]
