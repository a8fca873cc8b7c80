"""A Gymnasium-shaped environment interface and a small VLA-style built-in environment.

The interface follows Gymnasium's (``reset(seed=) -> (obs, info)``, ``step(action) -> (obs, reward,
terminated, truncated, info)``, ``action_space`` / ``observation_space``) without requiring
gymnasium; a gymnasium environment with a ``Discrete`` action space and these observation keys
plugs in unchanged.

``PickBlockEnv`` is manipulation in miniature: an image-like observation (a gripper and three
coloured blocks on a ``size x size`` table, one channel each), a language instruction ("pick up the
red block", also given as an index), five action tokens (up, down, left, right, grasp), and a sparse
reward: 1 when ``grasp`` closes on the named block, 0 otherwise. A grasp always ends the episode
(a wrong grasp is a failure); ``max_steps`` truncates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from klcore.errors import ConfigError

Observation = dict[str, Any]


@dataclass(frozen=True)
class Discrete:
    """Integers ``0 .. n - 1`` (Gymnasium's ``Discrete(n)``)."""

    n: int

    def contains(self, x: object) -> bool:
        return isinstance(x, (int, np.integer)) and 0 <= int(x) < self.n


@dataclass(frozen=True)
class Box:
    """Arrays of ``shape`` and ``dtype`` with values in ``[low, high]`` (Gymnasium's ``Box``)."""

    low: float
    high: float
    shape: tuple[int, ...]
    dtype: str = "float32"

    def contains(self, x: object) -> bool:
        return (
            isinstance(x, np.ndarray)
            and x.shape == self.shape
            and x.dtype == np.dtype(self.dtype)
            and bool((x >= self.low).all() and (x <= self.high).all())
        )


class Env(Protocol):
    """What the distillation loop needs from an environment (Gymnasium's ``Env`` shape)."""

    action_space: Discrete
    observation_space: dict[str, Discrete | Box]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Observation, dict]:
        """Start an episode (``seed`` fixes the task layout); return the first observation and info."""

    def step(self, action: int) -> tuple[Observation, float, bool, bool, dict]:
        """Apply one action token; ``(obs, reward, terminated, truncated, info)``."""


class PickBlockEnv:
    """Pick up the named block: a gripper and three coloured blocks on a grid (see the module docstring).

    Observation ``{"image": float32 [4, size, size], "instruction": int}``: channel 0 is the gripper,
    channels 1..3 the red, green and blue blocks; ``instruction`` indexes ``COLOURS``.
    """

    ACTIONS = ("up", "down", "left", "right", "grasp")
    COLOURS = ("red", "green", "blue")
    MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))

    def __init__(self, size: int = 5, max_steps: int = 12) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ConfigError(f"size must be an int >= 2 (at least 4 cells for a gripper and 3 blocks), got {size!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps must be an int >= 1, got {max_steps!r}")
        self.size = size
        self.max_steps = max_steps
        self.action_space = Discrete(len(self.ACTIONS))
        self.observation_space: dict[str, Discrete | Box] = {
            "image": Box(0.0, 1.0, (1 + len(self.COLOURS), size, size)),
            "instruction": Discrete(len(self.COLOURS)),
        }
        self._gripper = (0, 0)
        self._blocks: list[tuple[int, int]] = []
        self._target = 0
        self._t = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Observation, dict]:
        rng = np.random.default_rng(seed)
        cells = rng.choice(self.size * self.size, size=1 + len(self.COLOURS), replace=False)
        spots = [(int(c) // self.size, int(c) % self.size) for c in cells]
        self._gripper, self._blocks = spots[0], spots[1:]
        self._target = int(rng.integers(len(self.COLOURS)))
        self._t = 0
        self._done = False
        return self._observation(), self._info()

    def step(self, action: int) -> tuple[Observation, float, bool, bool, dict]:
        if self._done:
            raise ConfigError("step() called on a finished episode; call reset() first")
        if not self.action_space.contains(action):
            raise ConfigError(f"action must be an int in 0..{self.action_space.n - 1} ({self.ACTIONS}), got {action!r}")
        self._t += 1
        reward, terminated = 0.0, False
        if int(action) == 4:
            terminated = True
            reward = 1.0 if self._gripper == self._blocks[self._target] else 0.0
        else:
            dr, dc = self.MOVES[int(action)]
            r, c = self._gripper
            self._gripper = (min(max(r + dr, 0), self.size - 1), min(max(c + dc, 0), self.size - 1))
        truncated = not terminated and self._t >= self.max_steps
        self._done = terminated or truncated
        return self._observation(), reward, terminated, truncated, self._info()

    def _observation(self) -> Observation:
        image = np.zeros(self.observation_space["image"].shape, dtype=np.float32)  # type: ignore[union-attr]
        image[0][self._gripper] = 1.0
        for k, cell in enumerate(self._blocks):
            image[1 + k][cell] = 1.0
        return {"image": image, "instruction": self._target}

    def _info(self) -> dict:
        return {
            "instruction_text": f"pick up the {self.COLOURS[self._target]} block",
            "gripper": self._gripper,
            "target": self._blocks[self._target],
            "step": self._t,
        }


__all__ = ["Box", "Discrete", "Env", "Observation", "PickBlockEnv"]
