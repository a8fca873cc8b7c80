"""Independent, loop-based reference computations for the tests (plain Python floats)."""

from __future__ import annotations

import math

import torch


def valid_tokens(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Valid positions in row-major order."""
    return [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1]) if bool(mask[i, j])]


def covariances(log_prob: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> dict[tuple[int, int], float]:
    """Eq. 10 token by token."""
    pos = valid_tokens(mask)
    mean_lp = sum(float(log_prob[p]) for p in pos) / len(pos)
    mean_a = sum(float(adv[p]) for p in pos) / len(pos)
    return {p: (float(log_prob[p]) - mean_lp) * (float(adv[p]) - mean_a) for p in pos}


def ppo_clipped(old: torch.Tensor, new: torch.Tensor, adv: torch.Tensor, p: tuple[int, int], lo: float, hi: float) -> bool:
    r = math.exp(float(new[p]) - float(old[p]))
    a = float(adv[p])
    return -a * min(max(r, 1 - lo), 1 + hi) > -a * r
