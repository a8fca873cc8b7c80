"""Trainer configs: dataclasses validated on construction (TOML has no null: 0 means "off"/"auto")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from klcore.advantages import ESTIMATORS
from klcore.errors import ConfigError
from klcore.reduce import MODES

PRECISIONS = ("no", "bf16", "fp16")


def _positive(obj: object, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{n} must be a positive number, got {v!r}")


def _non_negative(obj: object, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{n} must be a number >= 0, got {v!r}")


@dataclass
class TrainerConfig:
    """The optimisation loop shared by every klcore trainer.

    One step = collect a batch, then ``ppo_epochs`` passes over it in ``mini_batches`` optimiser
    steps, each split into micro-batches of ``micro_batch_size`` rows per process (0: one forward
    per mini-batch). Loss denominators are global over ranks and micro-batches (``agg``).
    ``checkpoint_every = 0`` checkpoints only at the end; ``resume`` continues from the run
    folder's latest checkpoint when there is one. ``Trainer.evaluate`` runs before step 0, every
    ``eval_every`` steps (0: never in between) and after the last update.
    """

    steps: int = 50
    seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 0
    agg: str = "token-mean"
    norm_length: int = 0
    loss: str = "vanilla"
    loss_options: dict[str, Any] = field(default_factory=dict)
    regularisers: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint_every: int = 0
    eval_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    log_with: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        _positive(self, "steps", "lr", "max_grad_norm", "ppo_epochs", "mini_batches", "keep_checkpoints")
        _non_negative(self, "seed", "weight_decay", "warmup_steps", "micro_batch_size", "norm_length", "checkpoint_every", "eval_every")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.agg not in MODES:
            raise ConfigError(f"agg must be one of {MODES}, got {self.agg!r}")
        for name in ("loss_options", "regularisers", "metrics"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a table, got {getattr(self, name)!r}")


@dataclass
class GRPOConfig(TrainerConfig):
    """GRPO-family RL: ``prompts_per_step`` prompts per process, ``group_size`` samples each.

    ``max_new_tokens = 0`` uses the task's longest answer plus two. ``kl_coef > 0`` adds a KL
    penalty to a frozen copy of the initial policy with the ``kl_estimator`` (k1, k2 or k3), as in
    verl's ``use_kl_loss``. Evaluation runs before step 0, every ``eval_every`` steps (0: never in
    between), and after the last update (logged as ``eval/<task>_accuracy_final``). A constant
    ``norm_length`` for ``seq-mean-token-sum-norm`` defaults to ``max_new_tokens``.
    ``disable_dropout`` (TRL's default too) sets every ``nn.Dropout`` to p = 0, so the rollout, the
    old log-probs and the update see one policy and the on-policy ratio is exactly one.
    """

    lr: float = 1e-5
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = "grpo"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    eval_problems: int = 128
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "prompts_per_step", "group_size", "temperature", "top_p", "eval_problems")
        _non_negative(self, "max_new_tokens", "kl_coef")
        if self.top_p > 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.advantage not in ESTIMATORS:
            raise ConfigError(f"advantage must be one of {sorted(ESTIMATORS)}, got {self.advantage!r}")
        if self.advantage == "rloo" and self.group_size < 2:
            raise ConfigError("rloo needs group_size >= 2")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        rows = self.prompts_per_step * self.group_size
        if rows % self.mini_batches:
            raise ConfigError(
                f"prompts_per_step x group_size = {rows} rows must divide into mini_batches = {self.mini_batches}"
            )
