"""DPO-family losses against their closed forms (written with math, not torch), zero margin included."""

from __future__ import annotations

import math

import pytest
import torch
from hypo import KINDS, dpo_loss

from klcore.errors import ConfigError, DTypeError, NonFiniteError, ShapeError


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _closed_form(kind: str, delta: float, beta: float, eps: float, avg_delta: float) -> float:
    if kind == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta)
    if kind == "hinge":
        return max(0.0, 1 - beta * delta)
    if kind == "ipo":
        return (avg_delta - 1 / (2 * beta)) ** 2
    return (-(1 - eps) * _log_sigmoid(beta * delta) + eps * _log_sigmoid(-beta * delta)) / (1 - 2 * eps)


PAIRS = [  # policy chosen, policy rejected, ref chosen, ref rejected, chosen length, rejected length
    (-3.0, -7.0, -4.0, -5.0, 3, 5),
    (-10.0, -2.0, -9.5, -3.0, 8, 2),
    (-1.0, -1.0, -1.0, -1.0, 1, 1),
    (-20.0, -30.0, -25.0, -22.0, 10, 12),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_loss_matches_its_closed_form(kind: str, beta: float) -> None:
    eps = 0.2 if kind in ("sigmoid", "robust") else 0.0
    cols = list(zip(*PAIRS, strict=True))
    t = [torch.tensor(c, dtype=torch.float64) for c in cols]
    losses, metrics = dpo_loss(
        t[0], t[1], t[2], t[3], beta=beta, kind=kind, label_smoothing=eps, chosen_lengths=t[4], rejected_lengths=t[5]
    )
    assert losses.dtype == torch.float32 and losses.shape == (len(PAIRS),)
    for i, (pc, pr, rc, rr, lc, lr) in enumerate(PAIRS):
        delta = (pc - rc) - (pr - rr)
        avg = (pc - rc) / lc - (pr - rr) / lr
        assert losses[i].item() == pytest.approx(_closed_form(kind, delta, beta, eps, avg), rel=1e-5, abs=1e-6)
    chosen = [beta * (pc - rc) for pc, _, rc, *_ in PAIRS]
    rejected = [beta * (pr - rr) for _, pr, _, rr, *_ in PAIRS]
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / 4, rel=1e-5)
    assert metrics["rewards/margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 4, rel=1e-5)
    assert metrics["rewards/accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 4)


@pytest.mark.parametrize(
    ("kind", "beta", "eps", "expected"),
    [
        ("sigmoid", 0.1, 0.0, math.log(2)),
        ("sigmoid", 0.1, 0.3, math.log(2)),  # cDPO at zero margin: (1-eps) ln2 + eps ln2
        ("hinge", 0.1, 0.0, 1.0),
        ("ipo", 0.1, 0.0, 25.0),  # (1 / (2 beta))^2
        ("ipo", 0.5, 0.0, 1.0),
        ("robust", 0.1, 0.0, math.log(2)),  # robust at eps = 0 is sigmoid
        ("robust", 0.1, 0.2, math.log(2)),  # (0.8 ln2 - 0.2 ln2) / 0.6
    ],
)
def test_values_at_zero_margin(kind: str, beta: float, eps: float, expected: float) -> None:
    x = torch.tensor([-4.0, -1.5])
    y = torch.tensor([-2.0, -3.0])
    losses, metrics = dpo_loss(
        x, y, x, y, beta=beta, kind=kind, label_smoothing=eps,
        chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([4, 1]),
    )
    assert torch.allclose(losses, torch.full((2,), expected), atol=1e-6)
    assert metrics["rewards/margin"] == 0.0 and metrics["rewards/accuracy"] == 0.0


def test_sigmoid_gradient_matches_closed_form() -> None:
    """d/dπ_c of -log σ(βΔ) is -β σ(-βΔ); of the rejected term, +β σ(-βΔ)."""
    pc = torch.tensor([-3.0, -6.0], requires_grad=True)
    pr = torch.tensor([-5.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -6.0]), torch.tensor([-4.0, -2.5])
    beta = 0.3
    losses, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    for i in range(2):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        s = 1 / (1 + math.exp(beta * delta))
        assert pc.grad[i].item() == pytest.approx(-beta * s, rel=1e-5)
        assert pr.grad[i].item() == pytest.approx(beta * s, rel=1e-5)


def test_bad_inputs_raise_klcore_errors() -> None:
    x = torch.zeros(3)
    with pytest.raises(ConfigError, match="unknown DPO loss kind"):
        dpo_loss(x, x, x, x, kind="kto")
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ConfigError, match="robust"):
        dpo_loss(x, x, x, x, kind="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="hinge"):
        dpo_loss(x, x, x, x, kind="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, kind="ipo")
    with pytest.raises(ShapeError, match="ref_rejected_logps"):
        dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ShapeError, match=r"\[B\]"):
        dpo_loss(torch.zeros(3, 2), x, x, x)
    with pytest.raises(DTypeError):
        dpo_loss(torch.zeros(3, dtype=torch.long), x, x, x)
    with pytest.raises(NonFiniteError, match="pair 1"):
        dpo_loss(x, torch.tensor([0.0, float("nan"), 0.0]), x, x)
