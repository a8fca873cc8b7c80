"""HyPO (Song et al. 2024): DPO-family losses on offline pairs plus λ x a reverse-KL term on online samples.

``HyPOTrainer`` and ``HyPOConfig`` need transformers and are imported on first use.
"""

from __future__ import annotations

from typing import Any

from hypo.data import PreferencePair, TokenizedPairs, load_preference_pairs, tokenize_pairs
from hypo.losses import KINDS, dpo_loss
from hypo.online_kl import rloo_kl_surrogate, sequence_log_ratio
from hypo.reference import reference_logps


def __getattr__(name: str) -> Any:
    if name == "HyPOTrainer":
        from hypo.trainer import HyPOTrainer

        return HyPOTrainer
    if name == "HyPOConfig":
        from hypo.config import HyPOConfig

        return HyPOConfig
    raise AttributeError(f"module 'hypo' has no attribute {name!r}")


__all__ = [
    "KINDS",
    "HyPOConfig",
    "HyPOTrainer",
    "PreferencePair",
    "TokenizedPairs",
    "dpo_loss",
    "load_preference_pairs",
    "reference_logps",
    "rloo_kl_surrogate",
    "sequence_log_ratio",
    "tokenize_pairs",
]
