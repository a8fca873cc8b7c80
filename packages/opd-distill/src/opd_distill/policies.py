"""Action-token policies for environment students: a small network, a scripted teacher, rollouts, BC.

A policy maps a batch of observations (``image`` ``[N, C, H, W]`` float32, ``instruction`` ``[N]``
long) to logits ``[N, A]`` over the environment's action tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from klcore.errors import ConfigError, DataError
from opd_distill.env import Env

Policy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ActionTokenPolicy(nn.Module):
    """A small vision-language-action network: the instruction selects its block's channel (language
    grounding), a coordinate read-out locates the gripper and that block, and an MLP over the selected
    channels plus those coordinates gives logits over ``num_actions`` action tokens.

    ``image`` ``[N, C, H, W]`` with channel 0 the gripper and channel ``1 + instruction`` the named block.
    """

    coords: torch.Tensor

    def __init__(self, image_shape: Sequence[int], num_actions: int, hidden: int = 64) -> None:
        super().__init__()
        _, h, w = (int(d) for d in image_shape)
        self.num_actions = num_actions
        rows, cols = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        self.register_buffer("coords", torch.stack([rows.flatten(), cols.flatten()]), persistent=False)
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
        )

    def forward(self, image: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        flat = image.flatten(2)  # [N, C, H*W]
        gripper = flat[:, 0]
        target = flat[torch.arange(n, device=image.device), 1 + instruction]
        where = torch.cat([gripper @ self.coords.T, target @ self.coords.T], dim=-1)  # [N, 4]
        return self.net(where)


class ScriptedTeacher:
    """A good but imperfect teacher for ``PickBlockEnv``: logits ``margin`` on the actions that bring the
    gripper closer to the named block (``grasp`` once on it), 0 elsewhere. On unfamiliar states, the
    gripper in the table's bottom row, it is unsure: the margin drops to ``unsure_margin`` (nearly flat),
    like a teacher's epistemic uncertainty off its training distribution."""

    def __init__(self, margin: float = 4.0, unsure_margin: float = 0.5) -> None:
        self.margin = float(margin)
        self.unsure_margin = float(unsure_margin)

    def __call__(self, image: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        n, _, h, w = image.shape
        flat = image.flatten(2)  # [N, C, H*W]
        gripper = flat[:, 0].argmax(-1)
        target = flat[torch.arange(n), 1 + instruction].argmax(-1)
        gr, gc, tr, tc = gripper // w, gripper % w, target // w, target % w
        good = torch.stack([tr < gr, tr > gr, tc < gc, tc > gc, gripper == target], dim=-1)
        margin = torch.where(gr == h - 1, self.unsure_margin, self.margin)
        return good.float() * margin[:, None]


@dataclass
class Episodes:
    """``N`` episodes padded to ``T`` steps: ``image`` ``[N, T, C, H, W]``, ``instruction`` ``[N]``,
    ``actions`` ``[N, T]``, ``mask`` ``[N, T]`` (True on taken steps), ``success`` ``[N]`` (0/1)."""

    image: torch.Tensor
    instruction: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    success: torch.Tensor


@torch.no_grad()
def rollout(
    policy: Policy,
    make_env: Callable[[], Env],
    seeds: Sequence[int],
    *,
    group_size: int = 1,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Episodes:
    """Run ``group_size`` episodes per task seed with ``policy`` acting (sampled at ``temperature``)."""
    if not greedy and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}")
    envs = [make_env() for _ in seeds for _ in range(group_size)]
    first = [
        env.reset(seed=int(s))[0] for env, s in zip(envs, [s for s in seeds for _ in range(group_size)], strict=True)
    ]
    n, horizon = len(envs), int(getattr(envs[0], "max_steps", 64))
    instruction = torch.tensor([o["instruction"] for o in first], dtype=torch.long)
    obs = np.stack([o["image"] for o in first])
    images, actions, alive = [], [], []
    done = np.zeros(n, dtype=bool)
    success = torch.zeros(n)
    for _ in range(horizon):
        image = torch.from_numpy(obs.copy())
        logits = policy(image, instruction).float()
        if greedy:
            act = logits.argmax(-1)
        else:
            act = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        images.append(image)
        actions.append(act)
        alive.append(torch.from_numpy(~done))
        for i in np.flatnonzero(~done):
            o, reward, terminated, truncated, _ = envs[i].step(int(act[i]))
            obs[i] = o["image"]
            success[i] = reward
            done[i] = terminated or truncated
        if done.all():
            break
    return Episodes(
        image=torch.stack(images, 1),
        instruction=instruction,
        actions=torch.stack(actions, 1),
        mask=torch.stack(alive, 1),
        success=success,
    )


def success_rate(policy: Policy, make_env: Callable[[], Env], seeds: Sequence[int], *, seed: int = 0) -> float:
    """Fraction of the task seeds on which one sampled episode of ``policy`` succeeds."""
    return float(rollout(policy, make_env, seeds, generator=torch.Generator().manual_seed(seed)).success.mean())


def behaviour_cloning(
    policy: nn.Module, demos: Episodes, *, steps: int = 200, lr: float = 3e-3, seed: int = 0
) -> list[float]:
    """Fit ``policy`` to the demonstrations' actions (cross-entropy, full batch); the loss per step."""
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    m = demos.mask
    if not bool(m.any()):
        raise DataError("the demonstrations hold no step; collect at least one successful episode")
    torch.manual_seed(seed)
    t = demos.image.shape[1]
    image = demos.image[m]
    instruction = demos.instruction[:, None].expand(-1, t)[m]
    actions = demos.actions[m]
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(policy(image, instruction), actions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def successful(episodes: Episodes) -> Episodes:
    """The successful episodes only (demonstrations)."""
    keep = episodes.success > 0
    return Episodes(
        image=episodes.image[keep],
        instruction=episodes.instruction[keep],
        actions=episodes.actions[keep],
        mask=episodes.mask[keep],
        success=episodes.success[keep],
    )


__all__ = [
    "ActionTokenPolicy",
    "Episodes",
    "Policy",
    "ScriptedTeacher",
    "behaviour_cloning",
    "rollout",
    "success_rate",
    "successful",
]
