"""The environment, the scripted teacher, rollouts, behaviour cloning and EnvDistillTrainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opd_distill import (
    ActionTokenPolicy,
    EnvDistillConfig,
    EnvDistillTrainer,
    PickBlockEnv,
    ScriptedTeacher,
    behaviour_cloning,
    rollout,
    success_rate,
    successful,
)

from klcore.errors import ConfigError, VocabMismatchError


def _episode(env: PickBlockEnv, seed: int, actions: list[int]):
    obs, info = env.reset(seed=seed)
    trace = [(obs["image"].copy(), obs["instruction"], info["gripper"])]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        trace.append((obs["image"].copy(), reward, terminated, truncated, info["gripper"]))
        if terminated or truncated:
            break
    return trace


def test_environment_is_deterministic_under_a_seed():
    actions = [0, 3, 1, 1, 2, 3, 0, 4]
    a, b = _episode(PickBlockEnv(), 7, actions), _episode(PickBlockEnv(), 7, actions)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v
    layouts = {PickBlockEnv().reset(seed=s)[0]["image"].tobytes() for s in range(20)}
    assert len(layouts) > 15


def test_spaces_rewards_and_termination():
    env = PickBlockEnv(size=5, max_steps=3)
    obs, info = env.reset(seed=3)
    assert env.observation_space["image"].contains(obs["image"])
    assert env.observation_space["instruction"].contains(obs["instruction"])
    assert obs["image"][0].sum() == 1 and obs["image"][1:].sum() == 3
    assert info["instruction_text"].startswith("pick up the ")
    # walk to the target with the shortest path, then grasp: success
    gr, gc = info["gripper"]
    tr, tc = info["target"]
    path = [1 if tr > gr else 0] * abs(tr - gr) + [3 if tc > gc else 2] * abs(tc - gc) + [4]
    env = PickBlockEnv(size=5, max_steps=len(path))
    env.reset(seed=3)
    for a in path:
        _, reward, terminated, truncated, _ = env.step(a)
    assert reward == 1.0 and terminated and not truncated
    # a grasp elsewhere fails and ends the episode
    env.reset(seed=3)
    if path[0] != 4:
        _, reward, terminated, _, _ = env.step(4)
        assert reward == 0.0 and terminated
    # moving against a wall keeps the gripper on the table; max_steps truncates
    env = PickBlockEnv(size=5, max_steps=2)
    env.reset(seed=3)
    for _ in range(2):
        _, reward, terminated, truncated, info = env.step(0)
    assert truncated and not terminated and 0 <= info["gripper"][0] <= 4
    with pytest.raises(ConfigError):
        env.step(0)
    env.reset(seed=1)
    with pytest.raises(ConfigError):
        env.step(9)
    with pytest.raises(ConfigError):
        PickBlockEnv(size=1)


def test_scripted_teacher_prefers_moves_toward_the_named_block():
    env = PickBlockEnv()
    teacher = ScriptedTeacher(margin=4.0, unsure_margin=0.5)
    for seed in range(30):
        obs, info = env.reset(seed=seed)
        logits = teacher(torch.from_numpy(obs["image"])[None], torch.tensor([obs["instruction"]]))[0]
        (gr, gc), (tr, tc) = info["gripper"], info["target"]
        good = {0: tr < gr, 1: tr > gr, 2: tc < gc, 3: tc > gc, 4: (gr, gc) == (tr, tc)}
        best = logits.max().item()
        assert best == (0.5 if gr == 4 else 4.0)
        assert {a for a in range(5) if logits[a] == best} == {a for a, g in good.items() if g}
    greedy = rollout(teacher, PickBlockEnv, list(range(50)), greedy=True)
    assert greedy.success.mean().item() == 1.0  # the teacher's argmax always succeeds; sampling does not


def test_behaviour_cloning_fits_the_demonstrations():
    demos = successful(rollout(ScriptedTeacher(), PickBlockEnv, list(range(4)), greedy=True))
    policy = ActionTokenPolicy((4, 5, 5), 5)
    losses = behaviour_cloning(policy, demos, steps=150)
    assert losses[-1] < 0.1 * losses[0]
    m = demos.mask
    t = demos.image.shape[1]
    pred = policy(demos.image[m], demos.instruction[:, None].expand(-1, t)[m]).argmax(-1)
    assert bool((pred == demos.actions[m]).all())


def test_env_trainer_runs_and_moves_toward_the_teacher(tmp_path):
    torch.manual_seed(0)
    policy = ActionTokenPolicy((4, 5, 5), 5)
    teacher = ScriptedTeacher()
    cfg = EnvDistillConfig(steps=3, tasks_per_step=4, group_size=2, eval_episodes=20, eval_every=0, progress=False)
    trainer = EnvDistillTrainer(policy, teacher, PickBlockEnv, cfg, run_dir=tmp_path)
    history = trainer.train()
    for key in ("kl/reverse", "kl/forward", "entropy/mean", "success/mean", "opd/reward_mean"):
        assert np.isfinite(history[0][key]), key
    assert "eval/success" in history[0] and "eval/success_final" in history[-1]
    # full-vocabulary reverse-KL steps lower the reverse KL to the teacher on the student's states
    cfg = EnvDistillConfig(
        steps=40, tasks_per_step=8, group_size=4, eval_episodes=10, eval_every=0, progress=False, loss="full_reverse_kl"
    )
    history = EnvDistillTrainer(
        ActionTokenPolicy((4, 5, 5), 5), teacher, PickBlockEnv, cfg, run_dir=tmp_path / "b"
    ).train()
    first = np.mean([h["kl/reverse"] for h in history[:5]])
    last = np.mean([h["kl/reverse"] for h in history[-5:]])
    assert last < 0.6 * first


def test_env_trainer_checks_action_vocabulary(tmp_path):
    cfg = EnvDistillConfig(steps=1, progress=False)
    with pytest.raises(VocabMismatchError):
        EnvDistillTrainer(ActionTokenPolicy((4, 5, 5), 6), ScriptedTeacher(), PickBlockEnv, cfg, run_dir=tmp_path)


def test_success_rate_is_reproducible():
    policy = ActionTokenPolicy((4, 5, 5), 5)
    seeds = list(range(100, 140))
    assert success_rate(policy, PickBlockEnv, seeds, seed=1) == success_rate(policy, PickBlockEnv, seeds, seed=1)
