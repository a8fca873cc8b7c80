"""Objectives against independent float64 computations, closed forms and exhaustive enumeration."""

from __future__ import annotations

import math

import pytest
import torch
from opd_distill import (
    OBJECTIVES,
    divergence_loss,
    hard_ce_loss,
    opd_ppo_loss,
    opd_reinforce_loss,
    opd_reward,
)

from klcore.errors import ConfigError, MaskError, ShapeError, VocabMismatchError


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), -1)


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def _jsd64(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    m = beta * t + (1 - beta) * s
    return beta * _kl64(t, m) + (1 - beta) * _kl64(s, m)


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g) * 2
    t = torch.randn(3, 5, 11, generator=g) * 2
    return s, t, torch.ones(3, 5, dtype=torch.bool)


def _per_position(kind: str, s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-position values through divergence_loss with one position per row and seq-mean-token-sum."""
    flat_s, flat_t = s.reshape(-1, 1, s.shape[-1]), t.reshape(-1, 1, t.shape[-1])
    mask = torch.ones(flat_s.shape[:2], dtype=torch.bool)
    out = []
    for i in range(flat_s.shape[0]):
        loss, _ = divergence_loss(flat_s[i : i + 1], flat_t[i : i + 1], mask[i : i + 1], kind=kind, beta=beta)
        out.append(loss.double())
    return torch.stack(out).reshape(s.shape[:-1])


def test_full_vocab_divergences_match_float64(pair):
    s, t, mask = pair
    ps, pt = _probs(s), _probs(t)
    torch.testing.assert_close(_per_position("reverse_kl", s, t), _kl64(ps, pt), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_per_position("forward_kl", s, t), _kl64(pt, ps), atol=1e-5, rtol=1e-5)
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(_per_position("jsd", s, t, beta), _jsd64(ps, pt, beta), atol=1e-5, rtol=1e-5)
    loss, metrics = divergence_loss(s, t, mask, kind="reverse_kl")
    assert loss.item() == pytest.approx(_kl64(ps, pt).mean().item(), rel=1e-5)
    assert metrics["distill/reverse_kl"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_jsd_limits_swap_symmetry_and_bounds(pair):
    s, t, _ = pair
    # lim beta->0 JSD/beta = KL(T||S); lim beta->1 JSD/(1-beta) = KL(S||T); the gap shrinks like beta
    s1, t1 = s / 2, t / 2
    p1, q1 = _probs(s1), _probs(t1)
    for beta_of, target in ((lambda e: e, _kl64(q1, p1)), (lambda e: 1 - e, _kl64(p1, q1))):
        gaps = [
            ((_per_position("jsd", s1, t1, beta_of(e)) / e - target) / target).abs().max().item() for e in (1e-2, 1e-3)
        ]
        assert gaps[1] < 0.02 and gaps[1] < gaps[0] / 5
    for beta in (0.2, 0.5, 0.7):
        torch.testing.assert_close(
            _per_position("jsd", s, t, beta), _per_position("jsd", t, s, 1 - beta), atol=1e-5, rtol=1e-5
        )
    half = _per_position("jsd", s, t, 0.5)
    assert bool((half >= -1e-7).all()) and bool((half <= math.log(2) + 1e-6).all())
    assert _per_position("jsd", s, s, 0.3).abs().max().item() < 1e-6


def test_gkd_endpoint_convention(pair):
    s, t, _ = pair
    ps, pt = _probs(s), _probs(t)
    torch.testing.assert_close(_per_position("jsd", s, t, 0.0), _kl64(pt, ps), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_per_position("jsd", s, t, 1.0), _kl64(ps, pt), atol=1e-5, rtol=1e-5)
    # discontinuous on purpose: just inside the interval the value is ~beta KL(T||S), not KL(T||S)
    near = _per_position("jsd", s, t, 1e-6)
    assert near.max().item() < 1e-4 < _kl64(pt, ps).min().item()


def _tiny_policy() -> tuple[torch.Tensor, torch.Tensor]:
    """Two states, four actions: student parameters (logits, requires grad) and fixed teacher logits."""
    g = torch.Generator().manual_seed(3)
    theta = (torch.randn(2, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = torch.randn(2, 4, generator=g, dtype=torch.float64)
    return theta, teacher


def _enumerate(theta: torch.Tensor, teacher: torch.Tensor):
    """Every (state, action) as one row of length 1, weighted by S(a|s): exact expectations over the student."""
    states, actions = torch.meshgrid(torch.arange(2), torch.arange(4), indexing="ij")
    states, actions = states.reshape(-1), actions.reshape(-1)
    log_s = torch.log_softmax(theta, -1)[states, actions][:, None]
    log_t = torch.log_softmax(teacher, -1)[states, actions][:, None]
    prob = torch.softmax(theta, -1)[states, actions].detach()
    return log_s, log_t, prob, torch.ones_like(log_s, dtype=torch.bool)


def test_opd_reward_mean_is_minus_reverse_kl_and_entropy_identity():
    theta, teacher = _tiny_policy()
    log_s, log_t, prob, mask = _enumerate(theta, teacher)
    reward = opd_reward(log_s, log_t, mask).double()[:, 0]
    expected_r = (prob * reward).view(2, 4).sum(-1)
    s, t = torch.softmax(theta.detach(), -1), torch.softmax(teacher, -1)
    torch.testing.assert_close(expected_r, -_kl64(s, t), atol=1e-6, rtol=1e-6)
    # -KL(S||T) = E_S[log T] + H(S)
    e_log_t = (s * t.log()).sum(-1)
    entropy = -(s * s.log()).sum(-1)
    torch.testing.assert_close(expected_r, e_log_t + entropy, atol=1e-6, rtol=1e-6)


def test_reinforce_gradient_is_gradient_of_minus_kl_by_enumeration():
    theta, teacher = _tiny_policy()
    log_s, log_t, prob, mask = _enumerate(theta, teacher)
    # seq-mean-token-sum over 8 rows of one token: loss = (1/8) sum_{s,a} S(a|s) * (-r log S)
    loss, _ = opd_reinforce_loss(log_s, log_t, mask, weights=prob.float(), agg="seq-mean-token-sum")
    (grad,) = torch.autograd.grad(loss, theta)
    theta2 = theta.detach().clone().requires_grad_(True)
    kl = _kl64(torch.softmax(theta2, -1), torch.softmax(teacher, -1)).sum()
    (kl_grad,) = torch.autograd.grad(kl, theta2)
    # E[r grad log S] = grad(-KL): the loss (its negative, scaled 1/8) descends KL
    torch.testing.assert_close(grad.double() * 8, kl_grad, atol=1e-5, rtol=1e-4)


def test_ppo_form_at_ratio_one_has_the_reinforce_gradient():
    theta, teacher = _tiny_policy()
    log_s, log_t, prob, mask = _enumerate(theta, teacher)
    loss_r, _ = opd_reinforce_loss(log_s, log_t, mask, weights=prob.float())
    (g_r,) = torch.autograd.grad(loss_r, theta, retain_graph=True)
    loss_p, metrics = opd_ppo_loss(log_s.detach(), log_s, log_t, mask, weights=prob.float())
    (g_p,) = torch.autograd.grad(loss_p, theta)
    torch.testing.assert_close(g_p, g_r, atol=1e-6, rtol=1e-5)
    assert metrics["policy/clipfrac"].item() == 0.0


def test_ppo_form_freezes_reward_and_clips():
    old = torch.tensor([[-1.0, -1.0]])
    new = torch.tensor([[-0.5, -1.5]], requires_grad=True)  # ratios e^0.5 and e^-0.5
    teacher = torch.tensor([[-0.2, -0.2]])  # reward at rollout: +0.8 for both tokens
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = opd_ppo_loss(old, new, teacher, mask, clip_low=0.2, clip_high=0.2)
    # positive advantage: min(r A, clip(r) A) -> 1.2 A for the first token, e^-0.5 A for the second
    expected = -0.8 * (1.2 + math.exp(-0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["policy/clipfrac"].item() == pytest.approx(0.5)


def test_hard_ce_is_forward_kl_to_one_hot_teacher(pair):
    s, t, mask = pair
    one_hot = torch.full_like(t, float("-inf")).scatter(-1, t.argmax(-1, keepdim=True), 0.0)
    ce, _ = hard_ce_loss(s, t, mask)
    fkl, _ = divergence_loss(s, one_hot, mask, kind="forward_kl")
    assert ce.item() == pytest.approx(fkl.item(), rel=1e-5)
    manual = -torch.log_softmax(s.double(), -1).gather(-1, t.argmax(-1, keepdim=True)).mean()
    assert ce.item() == pytest.approx(manual.item(), rel=1e-5)


def test_row_weights_scale_each_rows_tokens(pair):
    s, t, mask = pair
    w = torch.tensor([0.0, 1.0, 3.0])
    weighted, _ = divergence_loss(s, t, mask, kind="forward_kl", weights=w)
    per_row = _kl64(_probs(t), _probs(s)).mean(-1)
    assert weighted.item() == pytest.approx((w.double() * per_row).mean().item(), rel=1e-5)


def test_registered_objectives_share_one_signature(pair):
    s, t, mask = pair
    tokens = torch.randint(0, s.shape[-1], s.shape[:2], generator=torch.Generator().manual_seed(1))
    old = torch.log_softmax(s, -1).gather(-1, tokens[..., None])[..., 0]
    for name, fn in OBJECTIVES.items():
        loss, metrics = fn(s.clone().requires_grad_(True), t, tokens, mask, old_log_prob=old, agg="token-mean")
        assert torch.isfinite(loss) and metrics, name
    rkl, _ = OBJECTIVES["full_reverse_kl"](s, t, tokens, mask)
    assert rkl.item() == pytest.approx(_kl64(_probs(s), _probs(t)).mean().item(), rel=1e-5)


def test_vocab_mismatch_and_bad_inputs_raise(pair):
    s, t, mask = pair
    with pytest.raises(VocabMismatchError, match="vocabulary"):
        divergence_loss(s, t[..., :7], mask)
    with pytest.raises(VocabMismatchError):
        hard_ce_loss(s, t[..., :7], mask)
    tokens = torch.zeros(mask.shape, dtype=torch.long)
    with pytest.raises(VocabMismatchError):
        OBJECTIVES["opd_reinforce"](s, t[..., :7], tokens, mask)
    with pytest.raises(ConfigError):
        divergence_loss(s, t, mask, kind="tvd")
    with pytest.raises(ConfigError):
        divergence_loss(s, t, mask, kind="jsd", beta=1.5)
    with pytest.raises(ShapeError):
        divergence_loss(s, t, mask, weights=torch.ones(2))
    with pytest.raises(ConfigError):
        divergence_loss(s, t, mask, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ConfigError, match="old_log_prob"):
        OBJECTIVES["opd_ppo"](s, t, tokens, mask)
    for fn in (divergence_loss, hard_ce_loss):
        with pytest.raises(MaskError, match="mask must be"):
            fn(s, t, mask.tolist())


def _grpo_trainer(tmp_path, name: str, **loss_options):
    from opd_distill import plugin

    from klcore.plugins import build_plugin_manager
    from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
    from klcore.trainer import GRPOConfig, GRPOTrainer

    plugins = build_plugin_manager(plugins=[("opd_distill", plugin)], load_entrypoints=False)
    cfg = GRPOConfig(
        steps=1, prompts_per_step=2, group_size=2, progress=False, loss=name, loss_options=loss_options
    )
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    return GRPOTrainer(model, char_tokenizer(), AdditionTask(digits=1), cfg, run_dir=tmp_path / name, plugins=plugins)


@pytest.mark.parametrize("name", ["opd_reinforce", "full_jsd"])
def test_grpo_trainer_with_a_distillation_objective_raises_config_error(tmp_path, name):
    # registered in klcore's "loss" registry, whose convention is the RL policy loss: a clear ConfigError
    with pytest.raises(ConfigError, match="not an RL policy loss"):
        _grpo_trainer(tmp_path, name).train()
    with pytest.raises(ConfigError, match="not an RL policy loss"):
        _grpo_trainer(tmp_path / "with-options", name, ratio=0.1).train()


def test_policy_loss_convention_and_unknown_options_raise_config_error(pair):
    s, t, mask = pair
    tokens = torch.zeros(mask.shape, dtype=torch.long)
    lp = torch.log_softmax(s, -1)[..., 0]
    for name, fn in OBJECTIVES.items():
        with pytest.raises(ConfigError, match=f"{name!r} is an opd-distill distillation objective"):
            fn(lp, lp, torch.ones_like(lp), mask, agg="token-mean", counts=None, norm_length=5)
        with pytest.raises(ConfigError, match="unknown options"):
            fn(s, t, tokens, mask, old_log_prob=lp, ratio=0.1)
