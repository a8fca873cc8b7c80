"""Outcome advantages from grouped rewards: ``[prompts, group] -> [prompts, group]`` float32.

Every completion of a prompt gets one advantage, broadcast over its tokens by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from klcore import _checks
from klcore.errors import ConfigError, ShapeError


def _rewards(rewards: object, min_group: int) -> torch.Tensor:
    r = _checks.tensor(rewards, "rewards")
    _checks.exact_dims(r, "rewards", 2, "[prompts, group]")
    if r.shape[0] == 0 or r.shape[1] < min_group:
        raise ShapeError(
            f"rewards must be [prompts, group] with at least one prompt and group >= {min_group}, "
            f"got shape {tuple(r.shape)}"
        )
    r = r.float()
    _checks.finite(r, "rewards")
    return r


def grpo(rewards: torch.Tensor, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps); with ``scale=False`` only the mean is removed.

    The std is the unbiased sample std (``torch.std``), as in TRL and verl; groups of one get 0.
    ``scale=False`` is Dr. GRPO's advantage (pair it with ``seq-mean-token-sum-norm`` aggregation).
    """
    r = _rewards(rewards, 1)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale or r.shape[1] == 1:
        return centred
    return centred / (r.std(dim=1, keepdim=True) + eps)


def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: group-mean baseline without std scaling (``grpo(rewards, scale=False)``)."""
    return grpo(rewards, scale=False)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: r_i - mean of the other G - 1 rewards of the group (G >= 2)."""
    r = _rewards(rewards, 2)
    g = r.shape[1]
    return (r - r.mean(dim=1, keepdim=True)) * (g / (g - 1))


ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}


def by_name(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The advantage estimator called ``name`` (``grpo``, ``dr_grpo`` or ``rloo``)."""
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


__all__ = ["ESTIMATORS", "by_name", "dr_grpo", "grpo", "rloo"]
