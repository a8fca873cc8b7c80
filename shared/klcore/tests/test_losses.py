"""The built-in PPO-clip policy loss against a hand-written per-token formula."""

from __future__ import annotations

import pytest
import torch

from klcore.errors import ConfigError, MaskError, ShapeError
from klcore.losses import ppo_clip_loss


def _reference(old, new, adv, mask, lo, hi):
    total, n = 0.0, 0
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            if mask[i, t]:
                r = float(torch.exp(new[i, t] - old[i, t]))
                a = float(adv[i, t])
                total += max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
                n += 1
    return total / n


@pytest.mark.parametrize(("lo", "hi"), [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
def test_matches_per_token_formula_and_autograd(lo: float, hi: float) -> None:
    old = torch.randn(4, 6) * 0.3 - 2
    new = (old + torch.randn(4, 6) * 0.4).requires_grad_()
    adv = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.3
    loss, metrics = ppo_clip_loss(old, new, adv, mask, clip_low=lo, clip_high=hi)
    assert float(loss.detach()) == pytest.approx(_reference(old, new.detach(), adv, mask, lo, hi), rel=1e-5)
    loss.backward()
    # gradient: -A r / N on tokens where the unclipped branch is active, zero elsewhere
    r = torch.exp(new.detach() - old)
    active = mask & ((-adv * r) >= (-adv * r.clamp(1 - lo, 1 + hi)))
    expected = torch.where(active, -adv * r, torch.zeros(())) / mask.sum()
    torch.testing.assert_close(new.grad, expected, rtol=1e-5, atol=1e-7)
    assert 0.0 <= float(metrics["policy/clipfrac"]) <= 1.0


def test_on_policy_loss_is_minus_mean_advantage() -> None:
    lp = torch.randn(3, 5)
    adv = torch.randn(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(lp, lp.clone(), adv, mask)
    assert float(loss) == pytest.approx(float(-adv.mean()), rel=1e-6)
    assert float(metrics["policy/clipfrac"]) == 0.0 and float(metrics["policy/ratio_mean"]) == pytest.approx(1.0)


def test_bad_inputs() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ShapeError):
        ppo_clip_loss(x, torch.zeros(2, 4), x, torch.ones(2, 3))
    with pytest.raises(MaskError):
        ppo_clip_loss(x, x, x, torch.zeros(2, 3))
    with pytest.raises(ConfigError):
        ppo_clip_loss(x, x, x, torch.ones(2, 3), clip_low=1.5)


def test_garbage_at_padding_does_not_reach_the_gradient() -> None:
    old = torch.tensor([[-1.0, -2.0, -300.0]])
    new = torch.tensor([[-1.1, -1.9, 0.0]], requires_grad=True)  # exp(300) would overflow at the padding
    adv = torch.ones(1, 3)
    mask = torch.tensor([[True, True, False]])
    loss, metrics = ppo_clip_loss(old, new, adv, mask)
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[0, 2] == 0
    assert torch.isfinite(metrics["policy/ratio_mean"])
