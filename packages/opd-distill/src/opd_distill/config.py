"""Configs of the distillation trainers (dataclasses validated on construction; 0 / "" mean off)."""

from __future__ import annotations

from dataclasses import dataclass, field

from klcore.errors import ConfigError
from klcore.trainer.config import TrainerConfig
from opd_distill.objectives import OBJECTIVES, OPTIONS
from opd_distill.paced import PacedConfig


def _check_common(cfg: TrainerConfig, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    for name in ("loss", "then_loss"):
        value = getattr(cfg, name)
        if (value or name == "loss") and value not in OBJECTIVES:
            raise ConfigError(f"{name} must be one of {sorted(OBJECTIVES)}, got {value!r}")
    unknown = sorted(set(cfg.loss_options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown loss_options {unknown}; the distillation objectives take {list(OPTIONS)}")
    if cfg.then_loss and cfg.switch_step < 1:  # type: ignore[attr-defined]
        raise ConfigError(f"then_loss={cfg.then_loss!r} needs switch_step >= 1, got {cfg.switch_step}")  # type: ignore[attr-defined]
    if not cfg.temperature > 0:  # type: ignore[attr-defined]
        raise ConfigError(f"temperature must be > 0, got {cfg.temperature}")  # type: ignore[attr-defined]
    _check_sampled_objectives(cfg)


#: objectives whose gradient is a score-function estimate on the student's own samples
SAMPLED = ("opd_reinforce", "opd_ppo")


def _check_sampled_objectives(cfg: TrainerConfig) -> None:
    """Refuse settings under which the sampled-token objectives estimate a biased gradient.

    Their expected gradient is grad -KL(S || T) only if the samples come from S itself: samples drawn
    at a temperature != 1 come from S_tau while the log-probs (and the KL) are S's, and REINFORCE on
    samples from before an earlier update of the same step is off-policy without importance weights
    (``opd_ppo`` carries them in its ratio; ``opd_reinforce`` does not).
    """
    used = {cfg.loss, cfg.then_loss} & set(SAMPLED)  # type: ignore[attr-defined]
    temperature = float(cfg.temperature)  # type: ignore[attr-defined]
    if used and temperature != 1.0:
        raise ConfigError(
            f"temperature={temperature} with {sorted(used)}: the samples would come from S at that temperature "
            "while the objective scores S itself, which biases the gradient of KL(S || T); use temperature=1.0 "
            "with a sampled-token objective, or a full-vocabulary objective (full_reverse_kl, ...) at any temperature"
        )
    if "opd_reinforce" in used and (cfg.ppo_epochs > 1 or cfg.mini_batches > 1):
        raise ConfigError(
            f"opd_reinforce with ppo_epochs={cfg.ppo_epochs}, mini_batches={cfg.mini_batches}: every update after "
            "the first would run REINFORCE on samples from an older student without importance weights; use "
            "ppo_epochs=1 and mini_batches=1 (accumulate with micro_batch_size), or opd_ppo, whose ratio corrects it"
        )
    for name in ("switch_step", "chunk_size", "eval_every"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name} must be an int >= 0, got {v!r}")


@dataclass
class DistillConfig(TrainerConfig):
    """On-policy distillation of a causal-LM student on a verifiable text task.

    Each step draws ``prompts_per_step`` problems from a fixed pool of ``problem_pool`` training
    problems, samples ``group_size`` student completions each (``temperature``), lets the frozen
    teacher score every generated position, and takes one update with the objective ``loss``
    (``loss_options``: ``beta`` for ``full_jsd``, ``clip_low``/``clip_high`` for ``opd_ppo``; options
    an objective does not use are ignored). ``then_loss`` switches objective at ``switch_step``
    (PACED's forward-KL-then-reverse-KL schedule). ``paced`` weights each problem by its pass rate.
    ``teacher_rollout_steps``: for the first that many steps the teacher generates the completions
    (sequence-level KD on teacher reference responses, PACED v1's forward-KL stage); 0 keeps every step
    on the student's samples. Pass rates always come from student rollouts.
    ``max_new_tokens = 0`` uses the task's longest answer plus two; ``chunk_size = 0`` lets klcore pick
    the vocabulary chunking; ``recompute`` recomputes each chunk in backward (less memory).
    ``slice_vocab`` compares student and teacher on the tokenizer's ``len(tokenizer)`` tokens only, for
    output heads padded to different sizes. Held-out greedy pass@1 runs at step 0, every ``eval_every`` steps and
    after the last update.
    """

    lr: float = 1e-4
    loss: str = "opd_reinforce"
    then_loss: str = ""
    switch_step: int = 0
    prompts_per_step: int = 16
    group_size: int = 4
    problem_pool: int = 256
    max_new_tokens: int = 0
    temperature: float = 1.0
    teacher_rollout_steps: int = 0
    chunk_size: int = 0
    recompute: bool = False
    eval_problems: int = 128
    disable_dropout: bool = True
    slice_vocab: bool = False
    paced: PacedConfig = field(default_factory=PacedConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_common(self, ("prompts_per_step", "group_size", "problem_pool", "eval_problems"))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if isinstance(self.teacher_rollout_steps, bool) or not isinstance(self.teacher_rollout_steps, int):
            raise ConfigError(f"teacher_rollout_steps must be an int >= 0, got {self.teacher_rollout_steps!r}")
        sampled = ("opd_reinforce", "opd_ppo")
        if self.teacher_rollout_steps < 0 or (
            self.teacher_rollout_steps > 0 and self.loss in sampled
        ) or (self.then_loss in sampled and self.teacher_rollout_steps > self.switch_step):
            raise ConfigError(
                f"teacher_rollout_steps={self.teacher_rollout_steps} is negative or overlaps a sampled-token OPD "
                "objective (opd_reinforce / opd_ppo need the student's own samples); use a full-vocabulary objective "
                "while the teacher generates"
            )
        if not isinstance(self.paced, PacedConfig):
            raise ConfigError(f"paced must be a PacedConfig, got {self.paced!r}")
        rows = self.prompts_per_step * self.group_size
        if rows % self.mini_batches:
            raise ConfigError(
                f"prompts_per_step x group_size = {rows} rows must divide into mini_batches = {self.mini_batches}"
            )


@dataclass
class EnvDistillConfig(TrainerConfig):
    """On-policy distillation of an action-token policy in an environment (VLA-OPD's loop).

    Each step the student rolls out ``group_size`` (G) episodes for each of ``tasks_per_step`` (B)
    task seeds; the frozen teacher labels every visited state; one update; fresh rollouts.
    ``eval_episodes`` held-out episodes (sampled actions) measure the success rate at step 0, every
    ``eval_every`` steps and after the last update.
    """

    lr: float = 1e-2
    loss: str = "opd_reinforce"
    then_loss: str = ""
    switch_step: int = 0
    tasks_per_step: int = 8
    group_size: int = 8
    temperature: float = 1.0
    chunk_size: int = 0
    recompute: bool = False
    eval_every: int = 10
    eval_episodes: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_common(self, ("tasks_per_step", "group_size", "eval_episodes"))
        rows = self.tasks_per_step * self.group_size
        if rows % self.mini_batches:
            raise ConfigError(
                f"tasks_per_step x group_size = {rows} rows must divide into mini_batches = {self.mini_batches}"
            )


__all__ = ["DistillConfig", "EnvDistillConfig"]
