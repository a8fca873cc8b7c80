"""``HyPOConfig``: the trainer config of HyPO (DPO when ``kl_coef = 0``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypo.losses import OBJECTIVES, check_options
from klcore.errors import ConfigError
from klcore.trainer.config import TrainerConfig


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class HyPOConfig(TrainerConfig):
    """One step: ``pairs_per_step`` offline pairs per process, the DPO-family loss ``loss`` (a registered
    objective: ``dpo-sigmoid``, ``dpo-ipo``, ``dpo-hinge``, ``dpo-robust``) with ``beta`` and
    ``label_smoothing``, plus ``kl_coef`` (λ) x the RLOO reverse-KL surrogate on ``group_size`` (k)
    completions sampled from the current policy (temperature 1) for each of the step's prompts.

    ``kl_coef = 0`` is DPO: nothing is sampled and no reference model is kept unless validation
    prompts are given. ``max_new_tokens = 0`` samples up to 4x the data's completion width (``online_width``; a warning
    says when most online samples still end without EOS).
    ``ref_cache`` (default ``RUN/ref_logps.safetensors``) holds the offline pairs' reference log-probs.
    Validation (``eval/*``) runs before step 0, every ``eval_every`` steps and after the last update,
    with ``eval_samples`` completions per validation prompt. One optimiser pass per step
    (``ppo_epochs = mini_batches = 1``), so the online samples are on-policy; accumulate with
    ``micro_batch_size``.
    """

    lr: float = 1e-6
    loss: str = "dpo-sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    kl_coef: float = 0.1
    group_size: int = 4
    pairs_per_step: int = 16
    max_new_tokens: int = 0
    ref_batch_size: int = 64
    ref_cache: str = ""
    eval_samples: int = 4
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.loss in OBJECTIVES,
            f"loss must name one of hypo's preference objectives ({', '.join(OBJECTIVES)}), got {self.loss!r}; "
            "RL policy losses (e.g. 'vanilla') belong to GRPOTrainer",
        )
        _check(
            not self.loss_options,
            f"hypo's objectives take no loss_options (got {sorted(self.loss_options)}); set beta and "
            "label_smoothing on the config instead",
        )
        _check(
            _number(self.beta) and math.isfinite(self.beta) and self.beta > 0,
            f"beta must be a finite positive number, got {self.beta!r}",
        )
        _check(
            _number(self.kl_coef) and math.isfinite(self.kl_coef) and self.kl_coef >= 0,
            f"kl_coef (lambda) must be a finite number >= 0, got {self.kl_coef!r}",
        )
        _check(
            isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 2,
            f"group_size (k, online samples per prompt) must be an int >= 2 for the leave-one-out baseline, "
            f"got {self.group_size!r}",
        )
        for name in ("pairs_per_step", "ref_batch_size", "eval_samples"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        for name in ("max_new_tokens", "eval_every"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an int >= 0, got {v!r}")
        _check(
            self.ppo_epochs == 1 and self.mini_batches == 1,
            f"HyPO takes one optimiser step per batch (ppo_epochs = mini_batches = 1, got {self.ppo_epochs} and "
            f"{self.mini_batches}) so the online samples stay on-policy; use micro_batch_size to accumulate",
        )
        _check(isinstance(self.ref_cache, str), f"ref_cache must be a path string, got {self.ref_cache!r}")
        check_options(OBJECTIVES[self.loss], self.beta, self.label_smoothing)  # label_smoothing valid for this loss


__all__ = ["HyPOConfig"]
