"""Generators f(u): closed-form values and derivatives, expectations by exhaustive enumeration, limits."""

from __future__ import annotations

import itertools
import math
from decimal import Decimal, localcontext

import pytest
import torch
from divergence_rl import KINDS, LOG_RATIO_BOUND, f_values

from klcore.divergences import alpha_divergence, js, kl
from klcore.errors import ConfigError, DTypeError, NonFiniteError

U = torch.tensor([0.05, 0.3, 0.7, 1.0, 1.4, 3.0, 20.0], dtype=torch.float64)
MASS_COVERING = ("forward_kl", "js", "alpha")
FIRST_DERIVATIVE_AT_ONE = {"forward_kl": 0.0, "forward_kl_plain": -1.0, "js": 0.0, "alpha": 0.0, "reverse_kl": 1.0}


def _closed_form(u: torch.Tensor, kind: str, alpha: float = 0.2) -> torch.Tensor:
    """The notes' formulas written directly in u (float64)."""
    if kind == "forward_kl":
        return u - 1 - torch.log(u)
    if kind == "forward_kl_plain":
        return -torch.log(u)
    if kind == "js":
        return 0.5 * (u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2))
    if kind == "alpha":
        return (u ** (1 - alpha) - (1 - alpha) * u - alpha) / (alpha * (alpha - 1))
    return u * torch.log(u)


def _second_derivative(u: torch.Tensor, kind: str, alpha: float = 0.2) -> torch.Tensor:
    return {
        "forward_kl": 1 / u**2,
        "forward_kl_plain": 1 / u**2,
        "js": 1 / (2 * u * (u + 1)),  # paper scale: the reference code's js_low_var is twice this
        "alpha": u ** (-alpha - 1),
        "reverse_kl": 1 / u,
    }[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_values_match_the_formulas(kind: str) -> None:
    torch.testing.assert_close(f_values(torch.log(U), kind), _closed_form(U, kind), rtol=1e-10, atol=1e-12)
    out32 = f_values(torch.log(U).float(), kind)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _closed_form(U, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_at_one_and_derivatives_by_autograd(kind: str) -> None:
    u = torch.cat([torch.ones(1, dtype=torch.float64), U]).requires_grad_(True)
    f = f_values(torch.log(u), kind)
    (first,) = torch.autograd.grad(f.sum(), u, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), u)
    assert float(f[0].detach()) == pytest.approx(0.0, abs=1e-15)
    assert float(first[0].detach()) == pytest.approx(FIRST_DERIVATIVE_AT_ONE[kind], abs=1e-12)
    torch.testing.assert_close(second, _second_derivative(u.detach(), kind), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", MASS_COVERING)
def test_non_negative_per_token_including_clamped_ratios(kind: str) -> None:
    r = torch.linspace(-60.0, 60.0, 4001)
    values = f_values(r, kind, alpha=0.7)
    assert torch.isfinite(values).all()
    assert (values >= 0).all()


def test_log_ratio_is_clamped_to_the_documented_bound() -> None:
    r = torch.tensor([LOG_RATIO_BOUND + 30.0, -LOG_RATIO_BOUND - 30.0], requires_grad=True)
    for kind in KINDS:
        out = f_values(r, kind)
        edge = f_values(torch.tensor([LOG_RATIO_BOUND, -LOG_RATIO_BOUND]), kind)
        torch.testing.assert_close(out.detach(), edge)
        (grad,) = torch.autograd.grad(out.sum(), r)
        assert torch.equal(grad, torch.zeros(2))


def _expect_under_ref(p: torch.Tensor, q: torch.Tensor, kind: str, alpha: float = 0.2) -> torch.Tensor:
    """sum_x q(x) f(p(x) / q(x)) by enumerating the vocabulary (rows of [N, V] float64 probabilities)."""
    return (q * f_values(torch.log(p) - torch.log(q), kind, alpha=alpha)).sum(-1)


def test_expectations_under_ref_are_the_closed_form_divergences() -> None:
    g = torch.Generator().manual_seed(1)
    theta_logits, ref_logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2, torch.randn(6, 5, generator=g,
                                                                                                     dtype=torch.float64)
    p, q = theta_logits.softmax(-1), ref_logits.softmax(-1)
    forward = (q * (q.log() - p.log())).sum(-1)  # KL(pi_ref || pi_theta)
    reverse = (p * (p.log() - q.log())).sum(-1)  # KL(pi_theta || pi_ref)
    m = (p + q) / 2
    jensen = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    for kind, want in (("forward_kl", forward), ("forward_kl_plain", forward), ("reverse_kl", reverse), ("js", jensen)):
        torch.testing.assert_close(_expect_under_ref(p, q, kind), want, rtol=1e-9, atol=1e-12)
    assert (jensen <= math.log(2)).all()
    # the same numbers from klcore's full-distribution functions (a second implementation)
    torch.testing.assert_close(_expect_under_ref(p, q, "forward_kl").float(), kl(ref_logits, theta_logits), rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(_expect_under_ref(p, q, "js").float(), js(theta_logits, ref_logits), rtol=1e-4, atol=1e-6)
    for a in (0.2, 0.5, 0.8):
        closed = (1 - (p ** (1 - a) * q**a).sum(-1)) / (a * (1 - a))
        torch.testing.assert_close(_expect_under_ref(p, q, "alpha", a), closed, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(_expect_under_ref(p, q, "alpha", a).float(),
                                   alpha_divergence(theta_logits, ref_logits, 1 - a), rtol=1e-4, atol=1e-6)


def test_sequence_level_forward_kl_by_enumerating_every_sequence() -> None:
    """Two autoregressive policies over V = 3 tokens and T = 3 steps (tables of next-token logits by
    prefix): E_{seq ~ ref}[sum_t f(u_t)] with per-token ratios along ref prefixes equals the
    sequence-level KL(ref || theta) computed from the 27 sequences' joint probabilities."""
    vocab, length = 3, 3
    g = torch.Generator().manual_seed(3)
    prefixes = [p for t in range(length) for p in itertools.product(range(vocab), repeat=t)]
    theta = {p: torch.randn(vocab, generator=g, dtype=torch.float64).log_softmax(-1) for p in prefixes}
    ref = {p: torch.randn(vocab, generator=g, dtype=torch.float64).log_softmax(-1) for p in prefixes}
    seq_kl = torch.zeros((), dtype=torch.float64)
    estimates = {kind: torch.zeros((), dtype=torch.float64) for kind in ("forward_kl", "forward_kl_plain")}
    for seq in itertools.product(range(vocab), repeat=length):
        lt = torch.stack([theta[seq[:t]][seq[t]] for t in range(length)])
        lr = torch.stack([ref[seq[:t]][seq[t]] for t in range(length)])
        weight = lr.sum().exp()
        seq_kl += weight * (lr.sum() - lt.sum())
        for kind in estimates:
            estimates[kind] += weight * f_values(lt - lr, kind).sum()
    assert float(seq_kl) > 0.05
    for value in estimates.values():
        assert float(value) == pytest.approx(float(seq_kl), rel=1e-10)


def test_alpha_limits_are_the_two_kls() -> None:
    u = U
    near_one = f_values(torch.log(u), "alpha", alpha=1 - 1e-8)
    near_zero = f_values(torch.log(u), "alpha", alpha=1e-8)
    torch.testing.assert_close(near_one, u - 1 - torch.log(u), rtol=0, atol=1e-6)
    torch.testing.assert_close(near_zero, u * torch.log(u) - u + 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, True, float("nan"), "0.5"])
def test_alpha_outside_the_open_interval_is_rejected(alpha) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        f_values(torch.zeros(3), "alpha", alpha=alpha)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="forward_kl"):
        f_values(torch.zeros(3), "kl")
    with pytest.raises(DTypeError):
        f_values(torch.zeros(3, dtype=torch.long), "js")
    with pytest.raises(NonFiniteError):
        f_values(torch.tensor([0.0, float("nan")]), "forward_kl")


def _exact(r: float, kind: str, alpha: float) -> tuple[float, float]:
    """f(e^r) and df/dr from the notes' formulas in u, at 60 significant digits (independent of torch)."""
    with localcontext() as ctx:
        ctx.prec = 60
        x, a = Decimal(r), Decimal(alpha)
        u = x.exp()
        if kind == "js":
            half = ((u + 1) / 2).ln()
            value, slope = (u * x - (u + 1) * half) / 2, u * (x - half) / 2
        elif kind == "forward_kl":
            value, slope = u - 1 - x, u - 1
        else:
            pow_u = ((1 - a) * x).exp()  # u^(1-alpha)
            value, slope = (pow_u - (1 - a) * u - a) / (a * (a - 1)), (u - pow_u) / a
        return float(value), float(slope)


@pytest.mark.parametrize("scale", [1e-3, 1e-6])
@pytest.mark.parametrize("kind", MASS_COVERING)
def test_float32_near_one_is_non_negative_and_accurate(kind: str, scale: float) -> None:
    """Dense log-ratios around u = 1 in float32: f >= 0 everywhere, values and gradients to float32 precision."""
    r = torch.linspace(-scale, scale, 2001, dtype=torch.float32).requires_grad_(True)
    values = f_values(r, kind, alpha=0.3)
    (grad,) = torch.autograd.grad(values.sum(), r)
    assert values.dtype == torch.float32 and (values >= 0).all()
    exact = torch.tensor([_exact(float(x), kind, 0.3) for x in r.detach().double()], dtype=torch.float64)
    value_want, slope_want = exact[:, 0], exact[:, 1]
    nonzero = r.detach() != 0
    rel = (values.detach().double() - value_want).abs()[nonzero] / value_want[nonzero]
    assert float(rel.max()) < 1e-6
    torch.testing.assert_close(grad.double(), slope_want, rtol=1e-6, atol=0.0)
