"""Trainers on accelerate: the shared loop (``Trainer``) and GRPO-family RL (``GRPOTrainer``).

``GRPOTrainer`` needs transformers (``klcore[lm]``) and is imported on first use.
"""

from typing import Any

from klcore.trainer.base import Trainer, step_seed
from klcore.trainer.config import GRPOConfig, TrainerConfig
from klcore.trainer.run_folder import MetricsLog, latest_checkpoint


def __getattr__(name: str) -> Any:
    if name in ("GRPOTrainer", "policy_forward"):
        from klcore.trainer import grpo

        return getattr(grpo, name)
    raise AttributeError(f"module 'klcore.trainer' has no attribute {name!r}")


__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "MetricsLog",
    "Trainer",
    "TrainerConfig",
    "latest_checkpoint",
    "policy_forward",
    "step_seed",
]
