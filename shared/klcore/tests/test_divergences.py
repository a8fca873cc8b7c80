"""Divergences between logit tensors and the k1/k2/k3 KL estimators against float64 brute force.

Every reference below is computed in the test itself: softmax by exp/normalise in float64 and the
divergence by its defining sum over the vocabulary, never by calling klcore.
"""

from __future__ import annotations

import math

import pytest
import torch

from klcore.divergences import (
    alpha_divergence,
    f_divergence,
    forward_kl,
    generalized_jsd,
    js,
    kl,
    kl_estimate,
    reverse_kl,
)
from klcore.errors import ConfigError, DTypeError, MaskError, NonFiniteError, ShapeError, VocabMismatchError

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TOL = {"rtol": 1e-4, "atol": 2e-6}


# ----------------------------------------------------------------------------- float64 references


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """softmax in float64 from the logits as given (bf16 values are exact in float64)."""
    z = logits.detach().double()
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_x p(x) log(p(x) / q(x)) for float64 probability tensors [..., V]."""
    return (p * torch.log(p / q)).sum(-1)


def ref_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    return _kl_ref(_probs(p_logits), _probs(q_logits))


def ref_gjsd(s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float) -> torch.Tensor:
    s, t = _probs(s_logits), _probs(t_logits)
    m = beta * t + (1.0 - beta) * s
    return beta * _kl_ref(t, m) + (1.0 - beta) * _kl_ref(s, m)


def ref_js(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = _probs(p_logits), _probs(q_logits)
    m = 0.5 * (p + q)
    return 0.5 * _kl_ref(p, m) + 0.5 * _kl_ref(q, m)


def ref_alpha(p_logits: torch.Tensor, q_logits: torch.Tensor, a: float) -> torch.Tensor:
    p, q = _probs(p_logits), _probs(q_logits)
    return (1.0 - (p**a * q ** (1.0 - a)).sum(-1)) / (a * (1.0 - a))


def _pair(shape=(2, 3), vocab=7, dtype=torch.float32, scale=2.0):
    p = (torch.randn(*shape, vocab, dtype=torch.float64) * scale).to(dtype)
    q = (torch.randn(*shape, vocab, dtype=torch.float64) * scale).to(dtype)
    return p, q


def _check(out: torch.Tensor, ref: torch.Tensor, **tol) -> None:
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **(tol or TOL))


# ----------------------------------------------------------------------------- values vs brute force


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [3, 17, 50])
def test_kl_forward_reverse_match_brute_force(dtype: torch.dtype, vocab: int) -> None:
    p, q = _pair(vocab=vocab, dtype=dtype)
    _check(kl(p, q), ref_kl(p, q))
    # distillation helpers take (student, teacher): forward = KL(T || S), reverse = KL(S || T)
    _check(forward_kl(p, q), ref_kl(q, p))
    _check(reverse_kl(p, q), ref_kl(p, q))
    assert not torch.allclose(kl(p, q), kl(q, p))  # the data is asymmetric enough to tell the order


def test_kl_explicit_loop_small_case() -> None:
    """One position, written out as the plain-Python sum of the definition."""
    p_logits = torch.tensor([[1.0, -0.5, 2.0, 0.0]])
    q_logits = torch.tensor([[0.3, 0.3, -1.0, 1.5]])
    pz = [math.exp(v) for v in p_logits[0].tolist()]
    qz = [math.exp(v) for v in q_logits[0].tolist()]
    p = [v / sum(pz) for v in pz]
    q = [v / sum(qz) for v in qz]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(kl(p_logits, q_logits)[0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_brute_force(dtype: torch.dtype, beta: float) -> None:
    s, t = _pair(vocab=11, dtype=dtype)
    out = generalized_jsd(s, t, beta)
    if beta == 0.0:
        expected = ref_kl(t, s)  # GKD convention: forward KL(T || S)
    elif beta == 1.0:
        expected = ref_kl(s, t)  # GKD convention: reverse KL(S || T)
    else:
        expected = ref_gjsd(s, t, beta)
    _check(out, expected)


def test_generalized_jsd_integer_beta_endpoints() -> None:
    s, t = _pair(vocab=6)
    _check(generalized_jsd(s, t, 0), ref_kl(t, s))
    _check(generalized_jsd(s, t, 1), ref_kl(s, t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_js_matches_brute_force_and_gjsd_half(dtype: torch.dtype) -> None:
    p, q = _pair(vocab=9, dtype=dtype)
    out = js(p, q)
    _check(out, ref_js(p, q))
    torch.testing.assert_close(out, generalized_jsd(p, q, 0.5), rtol=1e-5, atol=1e-6)
    assert bool((out >= 0).all()) and bool((out <= math.log(2.0) + 1e-6).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5, 0.8, 0.95])
def test_alpha_divergence_matches_brute_force(dtype: torch.dtype, alpha: float) -> None:
    p, q = _pair(vocab=13, dtype=dtype)
    _check(alpha_divergence(p, q, alpha), ref_alpha(p, q, alpha), rtol=1e-4, atol=1e-5)


def test_alpha_half_is_four_squared_hellinger() -> None:
    p, q = _pair(vocab=8)
    pp, qq = _probs(p), _probs(q)
    hellinger_sq = 0.5 * ((pp.sqrt() - qq.sqrt()) ** 2).sum(-1)
    _check(alpha_divergence(p, q, 0.5), 4.0 * hellinger_sq)


def _js_generator(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * (u * torch.log(u) - (1.0 + u) * torch.log((1.0 + u) / 2.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_f_divergence_generators(dtype: torch.dtype) -> None:
    p, q = _pair(vocab=10, dtype=dtype, scale=1.5)
    _check(f_divergence(p, q, lambda u: u * torch.log(u)), ref_kl(p, q), rtol=1e-4, atol=1e-5)
    _check(f_divergence(p, q, lambda u: -torch.log(u)), ref_kl(q, p), rtol=1e-4, atol=1e-5)
    _check(f_divergence(p, q, _js_generator), ref_js(p, q), rtol=1e-4, atol=1e-5)
    # total variation, f(u) = |u - 1| / 2: a generator whose value is known independently
    tv = 0.5 * (_probs(p) - _probs(q)).abs().sum(-1)
    _check(f_divergence(p, q, lambda u: 0.5 * (u - 1.0).abs()), tv, rtol=1e-4, atol=1e-5)


def test_leading_shapes_are_preserved() -> None:
    p, q = _pair(shape=(2, 3, 4), vocab=5)
    for fn in (kl, js, lambda a, b: generalized_jsd(a, b, 0.3), lambda a, b: alpha_divergence(a, b, 0.4)):
        out = fn(p, q)
        assert out.shape == (2, 3, 4)
    _check(kl(p[0, 0, 0], q[0, 0, 0]), ref_kl(p[0, 0, 0], q[0, 0, 0]))  # 1-D input: a scalar
    # a non-contiguous view gives the same as its contiguous copy
    pt, qt = p.transpose(0, 2), q.transpose(0, 2)
    _check(kl(pt, qt), ref_kl(pt.contiguous(), qt.contiguous()))


# ----------------------------------------------------------------------------- identities and limits


def test_divergences_of_identical_inputs_are_zero() -> None:
    p, _ = _pair(vocab=12)
    shifted = p + 3.0  # same distribution, different logits
    zeros = torch.zeros(p.shape[:-1])
    for fn in (kl, js, lambda a, b: generalized_jsd(a, b, 0.3), lambda a, b: alpha_divergence(a, b, 0.6)):
        torch.testing.assert_close(fn(p, p), zeros, rtol=0, atol=5e-6)
        torch.testing.assert_close(fn(p, shifted), zeros, rtol=0, atol=1e-5)


def test_js_bounds_and_disjoint_supports() -> None:
    p, q = _pair(shape=(64,), vocab=6, scale=4.0)
    out = js(p, q)
    assert bool((out >= 0).all()) and bool((out <= math.log(2.0)).all())
    # disjoint supports (up to e^-60): JS is ln 2
    big = torch.full((2, 8), -30.0)
    a, b = big.clone(), big.clone()
    a[:, :4] = 30.0
    b[:, 4:] = 30.0
    torch.testing.assert_close(js(a, b), torch.full((2,), math.log(2.0)), rtol=0, atol=1e-6)


def test_generalized_jsd_swap_symmetry() -> None:
    s, t = _pair(vocab=9)
    for beta in (0.0, 0.2, 0.5, 0.7, 1.0):
        torch.testing.assert_close(generalized_jsd(s, t, beta), generalized_jsd(t, s, 1.0 - beta), rtol=1e-5, atol=1e-6)


def test_generalized_jsd_limits_near_endpoints() -> None:
    s, t = _pair(shape=(8,), vocab=10, scale=1.5)
    eps = 1e-4
    near0 = generalized_jsd(s, t, eps).double() / eps
    near1 = generalized_jsd(s, t, 1.0 - eps).double() / eps
    torch.testing.assert_close(near0, ref_kl(t, s), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(near1, ref_kl(s, t), rtol=2e-2, atol=2e-3)
    # the interior value itself vanishes at the endpoints
    assert float(generalized_jsd(s, t, eps).abs().max()) < 1e-2


def test_alpha_divergence_limits() -> None:
    p, q = _pair(shape=(8,), vocab=10, scale=1.5)
    torch.testing.assert_close(alpha_divergence(p, q, 1.0 - 1e-3).double(), ref_kl(p, q), rtol=2e-2, atol=5e-3)
    torch.testing.assert_close(alpha_divergence(p, q, 1e-3).double(), ref_kl(q, p), rtol=2e-2, atol=5e-3)


# ----------------------------------------------------------------------------- chunking, checkpointing, grads


def _all_fns():
    return {
        "kl": kl,
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "js": js,
        "gjsd0": lambda a, b, **kw: generalized_jsd(a, b, 0.0, **kw),
        "gjsd": lambda a, b, **kw: generalized_jsd(a, b, 0.3, **kw),
        "gjsd1": lambda a, b, **kw: generalized_jsd(a, b, 1.0, **kw),
        "alpha": lambda a, b, **kw: alpha_divergence(a, b, 0.4, **kw),
        "f": lambda a, b, **kw: f_divergence(a, b, _js_generator, **kw),
    }


@pytest.mark.parametrize("name", list(_all_fns()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(name: str, dtype: torch.dtype) -> None:
    fn = _all_fns()[name]
    p, q = _pair(shape=(2, 5), vocab=7, dtype=dtype)
    full = fn(p, q)
    for cs in (1, 3, None):
        torch.testing.assert_close(fn(p, q, chunk_size=cs), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(_all_fns()))
def test_checkpoint_and_chunking_keep_values_and_gradients(name: str) -> None:
    fn = _all_fns()[name]
    p0, q0 = _pair(shape=(3, 4), vocab=6)
    w = torch.randn(3, 4)  # a non-uniform upstream gradient

    def run(**kw):
        p, q = p0.clone().requires_grad_(), q0.clone().requires_grad_()
        out = fn(p, q, **kw)
        (out * w).sum().backward()
        return out.detach(), p.grad, q.grad

    base = run()
    assert base[1].abs().sum() > 0 and base[2].abs().sum() > 0
    for kw in ({"checkpoint": True}, {"checkpoint": True, "chunk_size": 5}, {"chunk_size": 1}):
        got = run(**kw)
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_kl_gradient_matches_closed_form() -> None:
    """d KL(P||Q)/d q_logits = q - p and d/d p_logits = p * (log p - log q - KL)."""
    p = torch.randn(4, 9, requires_grad=True)
    q = torch.randn(4, 9, requires_grad=True)
    kl(p, q, checkpoint=True, chunk_size=2).sum().backward()
    pp, qq = _probs(p), _probs(q)
    k = _kl_ref(pp, qq).unsqueeze(-1)
    torch.testing.assert_close(q.grad.double(), qq - pp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.grad.double(), pp * (torch.log(pp / qq) - k), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.25, 0.5])
def test_gjsd_and_alpha_gradients_match_float64_autograd(beta: float) -> None:
    s0, t0 = _pair(shape=(3,), vocab=8)
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    generalized_jsd(s, t, beta, checkpoint=True).sum().backward()
    s64, t64 = s0.double().requires_grad_(), t0.double().requires_grad_()
    sp, tp = torch.softmax(s64, -1), torch.softmax(t64, -1)
    m = beta * tp + (1 - beta) * sp
    (beta * (tp * torch.log(tp / m)).sum() + (1 - beta) * (sp * torch.log(sp / m)).sum()).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-6)

    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    alpha_divergence(s, t, beta).sum().backward()
    s64, t64 = s0.double().requires_grad_(), t0.double().requires_grad_()
    sp, tp = torch.softmax(s64, -1), torch.softmax(t64, -1)
    ((1 - (sp**beta * tp ** (1 - beta)).sum(-1)) / (beta * (1 - beta))).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", list(_all_fns()))
def test_mask_zeroes_positions_and_tolerates_masked_nan(name: str) -> None:
    fn = _all_fns()[name]
    p, q = _pair(shape=(2, 4), vocab=5)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    unmasked = fn(p, q)
    out = fn(p, q, mask=mask)
    torch.testing.assert_close(out, torch.where(mask, unmasked, torch.zeros(())), rtol=0, atol=0)
    assert bool((out[~mask] == 0).all())
    # a float 0/1 mask is the same
    torch.testing.assert_close(fn(p, q, mask=mask.float()), out, rtol=0, atol=0)
    # NaN / inf logits at masked-out positions do not raise and leave the rest untouched
    p_bad, q_bad = p.clone(), q.clone()
    p_bad[0, 1] = float("nan")
    q_bad[1, 3, 2] = float("inf")
    out_bad = fn(p_bad, q_bad, mask=mask)
    torch.testing.assert_close(out_bad, out, rtol=0, atol=0)
    with pytest.raises(NonFiniteError):
        fn(p_bad, q_bad)


def test_masked_nan_rows_keep_gradients_of_valid_rows() -> None:
    p = torch.randn(3, 5)
    p[1] = float("nan")
    p.requires_grad_()
    q = torch.randn(3, 5)
    mask = torch.tensor([True, False, True])
    kl(p, q, mask=mask).sum().backward()
    pp, qq = _probs(p.detach()[[0, 2]]), _probs(q[[0, 2]])
    expected = pp * (torch.log(pp / qq) - _kl_ref(pp, qq).unsqueeze(-1))
    torch.testing.assert_close(p.grad[[0, 2]].double(), expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- kl_estimate


def test_kl_estimators_exact_expectations_by_enumeration() -> None:
    for vocab in (3, 6, 20):
        a = torch.randn(vocab, dtype=torch.float64) * 1.5
        b = torch.randn(vocab, dtype=torch.float64) * 1.5
        p, q = _probs(a), _probs(b)
        lp, lq = torch.log(p), torch.log(q)
        true_kl = float(_kl_ref(p, q))
        # the estimators are evaluated at every vocabulary item x (as if x had been sampled)
        raw = {kind: kl_estimate(lp.float(), lq.float(), kind) for kind in ("k1", "k2", "k3")}
        for k in raw.values():
            assert k.dtype == torch.float32 and k.shape == (vocab,)
        k1, k2, k3 = (raw[kind].double() for kind in ("k1", "k2", "k3"))
        expect_k2 = 0.5 * sum(float(p[x]) * math.log(float(p[x]) / float(q[x])) ** 2 for x in range(vocab))
        assert float((p * k1).sum()) == pytest.approx(true_kl, rel=1e-5, abs=1e-6)
        assert float((p * k3).sum()) == pytest.approx(true_kl, rel=1e-5, abs=1e-6)
        assert float((p * k2).sum()) == pytest.approx(expect_k2, rel=1e-5, abs=1e-6)
        assert bool((k3 >= 0).all())
        assert bool((k1 < 0).any())  # k1 is unbiased but not pointwise non-negative


def test_kl_estimate_output_dtype_and_per_sample_formulas() -> None:
    lp = -torch.rand(3, 4).to(torch.bfloat16) * 3
    lq = -torch.rand(3, 4).to(torch.bfloat16) * 3
    r = lq.double() - lp.double()
    for kind, expected in (("k1", -r), ("k2", 0.5 * r * r), ("k3", torch.exp(r) - 1.0 - r)):
        out = kl_estimate(lp, lq, kind)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_estimate(lp, lq), kl_estimate(lp, lq, "k3"), rtol=0, atol=0)  # default is k3


def test_k3_is_non_negative_everywhere() -> None:
    r = torch.cat([torch.linspace(-30, 10, 2001), torch.tensor([0.0, 1e-8, -1e-8, 1e-4, -1e-4, 1e-30])])
    lp = torch.zeros_like(r)
    k3 = kl_estimate(lp, r, "k3")
    assert bool((k3 >= 0).all())
    assert float(kl_estimate(torch.tensor([-1.3]), torch.tensor([-1.3]), "k3")) == 0.0


def test_k2_gradient_is_kl_gradient_in_expectation() -> None:
    """E_{x~p}[grad k2(x)] = grad KL(p_theta || q) when the sampler is p_theta (pathwise, samples fixed)."""
    theta = torch.randn(7, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    th = theta.float().requires_grad_()
    lp = torch.log_softmax(th, -1)
    lq = torch.log_softmax(b.float(), -1)
    weights = torch.softmax(theta, -1).float()  # the sampling probabilities, held fixed
    (weights * kl_estimate(lp, lq, "k2")).sum().backward()
    th64 = theta.clone().requires_grad_()
    pp, qq = torch.softmax(th64, -1), torch.softmax(b, -1)
    (pp * torch.log(pp / qq)).sum().backward()
    torch.testing.assert_close(th.grad.double(), th64.grad, rtol=1e-4, atol=1e-6)


def test_kl_estimate_mask() -> None:
    lp = -torch.rand(2, 3)
    lq = -torch.rand(2, 3)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    lp_bad = lp.clone()
    lp_bad[0, 1] = float("nan")
    lp_bad[1, 0] = float("-inf")
    for kind in ("k1", "k2", "k3"):
        full = kl_estimate(lp, lq, kind)
        out = kl_estimate(lp_bad, lq, kind, mask=mask)
        torch.testing.assert_close(out, torch.where(mask, full, torch.zeros(())), rtol=0, atol=0)
        with pytest.raises(NonFiniteError):
            kl_estimate(lp_bad, lq, kind)
    with pytest.raises(MaskError):
        kl_estimate(lp, lq, mask=torch.ones(3, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------- bad inputs


ALL_PAIR_FNS = pytest.mark.parametrize("fn", list(_all_fns().values()), ids=list(_all_fns()))


@ALL_PAIR_FNS
def test_vocab_and_shape_mismatch(fn) -> None:
    with pytest.raises(VocabMismatchError):
        fn(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ShapeError):
        fn(torch.randn(2, 5), torch.randn(3, 5))
    with pytest.raises(ShapeError):
        fn(torch.randn(2, 3, 5), torch.randn(6, 5))
    with pytest.raises(ShapeError):
        fn(torch.tensor(1.0), torch.tensor(1.0))  # 0-d: no vocabulary axis


@ALL_PAIR_FNS
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", [0, 1])
def test_non_finite_logits_raise(fn, bad: float, which: int) -> None:
    pair = [torch.randn(2, 3, 5), torch.randn(2, 3, 5)]
    pair[which][1, 2, 3] = bad
    with pytest.raises(NonFiniteError):
        fn(*pair)
    pair[which][1, 2, :] = bad  # a whole row
    with pytest.raises(NonFiniteError):
        fn(*pair)


def test_alpha_divergence_with_zero_probability_token() -> None:
    """A -inf logit is a zero probability; the alpha-divergence sum is still finite and exact."""
    p, q = _pair(shape=(2,), vocab=6)
    p[0, 2] = float("-inf")
    q[1, 4] = float("-inf")
    expected = ref_alpha(p, q, 0.3)
    assert bool(torch.isfinite(expected).all())
    _check(alpha_divergence(p, q, 0.3), expected)


@ALL_PAIR_FNS
def test_integer_logits_and_bad_masks(fn) -> None:
    with pytest.raises(DTypeError):
        fn(torch.randint(0, 5, (2, 5)), torch.randn(2, 5))
    with pytest.raises(DTypeError):
        fn(torch.randn(2, 5), torch.randint(0, 5, (2, 5)))
    with pytest.raises(DTypeError):
        fn(torch.randn(2, 5).tolist(), torch.randn(2, 5))
    p, q = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(MaskError):
        fn(p, q, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(MaskError):
        fn(p, q, mask=torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(MaskError):
        fn(p, q, mask=torch.full((2, 3), 2.0))
    with pytest.raises(ConfigError):
        fn(p, q, chunk_size=0)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "0.5", None])
def test_bad_beta(beta) -> None:
    with pytest.raises(ConfigError):
        generalized_jsd(torch.randn(2, 4), torch.randn(2, 4), beta)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 2.0, float("nan"), "0.5"])
def test_bad_alpha(alpha) -> None:
    with pytest.raises(ConfigError):
        alpha_divergence(torch.randn(2, 4), torch.randn(2, 4), alpha)


def test_bad_generator_and_kl_estimate_args() -> None:
    with pytest.raises(ConfigError):
        f_divergence(torch.randn(2, 4), torch.randn(2, 4), "kl")
    lp, lq = -torch.rand(2, 3), -torch.rand(2, 3)
    for kind in ("k4", "K1", "", None):
        with pytest.raises(ConfigError):
            kl_estimate(lp, lq, kind)
    with pytest.raises(ShapeError):
        kl_estimate(lp, -torch.rand(3, 2))
    with pytest.raises(DTypeError):
        kl_estimate(torch.zeros(2, 3, dtype=torch.long), lq)
    bad = lq.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        kl_estimate(lp, bad)


def test_kl_estimate_overflow_is_an_error_not_inf() -> None:
    with pytest.raises(NonFiniteError, match="k3"):
        kl_estimate(torch.tensor([-100.0]), torch.tensor([0.0]), "k3")


def test_bools_are_not_numbers() -> None:
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ConfigError):
        generalized_jsd(s, t, True)
    with pytest.raises(ConfigError):
        kl(s, t, chunk_size=True)


def test_minus_inf_logits_mean_zero_probability() -> None:
    """Masked vocabulary (-inf logits) is a valid distribution: values on the support, finite gradients."""
    p = torch.tensor([[1.0, 3.0, float("-inf"), 0.5]], requires_grad=True)
    q = torch.tensor([[0.2, float("-inf"), float("-inf"), 1.5]], requires_grad=True)
    both = torch.tensor([[2.0, 0.0, float("-inf"), float("-inf")]])
    P = torch.softmax(p.detach().double(), -1)
    Q = torch.softmax(q.detach().double(), -1)
    B = torch.softmax(both.double(), -1)
    # KL(B || P): B's support is inside P's
    ref = sum(float(B[0, i] * (B[0, i].log() - P[0, i].log())) for i in range(2))
    assert float(kl(both, p.detach())) == pytest.approx(ref, rel=1e-5)
    assert float(kl(both, both)) == 0.0
    m = 0.5 * (P + Q)
    ref_js = 0.5 * sum(float(P[0, i] * (P[0, i] / m[0, i]).log()) for i in range(4) if P[0, i] > 0) + 0.5 * sum(
        float(Q[0, i] * (Q[0, i] / m[0, i]).log()) for i in range(4) if Q[0, i] > 0
    )
    out = js(p, q)
    assert float(out.detach()) == pytest.approx(ref_js, rel=1e-5)
    out.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    g = generalized_jsd(p.detach(), q.detach(), 0.5)
    assert float(g) == pytest.approx(ref_js, rel=1e-5)
    with pytest.raises(NonFiniteError):  # P puts mass where Q has none: KL(P || Q) is infinite
        kl(p.detach(), q.detach())


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_closed_form_backward_in_bf16_with_masked_garbage_and_a_frozen_teacher(beta: float) -> None:
    """bf16 logits get bf16 gradients equal to float64 autograd's (to bf16 precision); a masked-out row
    holding NaN gets exactly zero gradient; a teacher without grad gets none; -inf logits stay finite."""
    g = torch.Generator().manual_seed(7)
    s0, t0 = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    s0[1, :5] = -float("inf")  # a masked vocabulary in both
    t0[1, :5] = -float("inf")
    mask = torch.tensor([True, True, True, False, True, True])
    s_bad = s0.clone()
    s_bad[3] = float("nan")
    s = s_bad.to(torch.bfloat16).requires_grad_()
    t = t0.to(torch.bfloat16)
    generalized_jsd(s, t, beta, mask=mask, chunk_size=2).sum().backward()
    assert s.grad.dtype == torch.bfloat16 and t.grad is None
    assert torch.equal(s.grad[3], torch.zeros(40, dtype=torch.bfloat16)) and torch.isfinite(s.grad).all()
    # float64 autograd on the finite columns (dropping the -inf ones leaves each distribution unchanged)
    keep = torch.ones(40, dtype=torch.bool)
    keep[:5] = False
    torch.testing.assert_close(s.grad[1, :5].double(), torch.zeros(5, dtype=torch.float64))
    s64 = s0.to(torch.bfloat16).double().requires_grad_()
    for row in (0, 1, 2, 4, 5):
        cols = keep if row == 1 else torch.ones(40, dtype=torch.bool)
        sp, tp = s64[row, cols].softmax(-1), t[row, cols].double().softmax(-1)
        if beta == 0.0:
            value = (tp * (tp.log() - sp.log())).sum()
        elif beta == 1.0:
            value = (sp * (sp.log() - tp.log())).sum()
        else:
            m = beta * tp + (1 - beta) * sp
            value = beta * (tp * (tp / m).log()).sum() + (1 - beta) * (sp * (sp / m).log()).sum()
        value.backward()
    torch.testing.assert_close(s.grad.double()[mask], s64.grad[mask], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("fn", [kl, js, lambda p, q: generalized_jsd(p, q, 0.2)])
def test_float32_inputs_are_left_untouched(fn) -> None:
    p0, q0 = torch.randn(5, 33), torch.randn(5, 33)
    p, q = p0.clone().requires_grad_(), q0.clone().requires_grad_()
    fn(p, q).sum().backward()
    assert torch.equal(p.detach(), p0) and torch.equal(q.detach(), q0)


@pytest.mark.parametrize("fn", [reverse_kl, lambda s, t: generalized_jsd(s, t, 0.3)])
def test_a_retained_graph_gives_the_same_gradient_twice(fn) -> None:  # type: ignore[no-untyped-def]
    """The gradients stored in forward are scaled out of place: a second backward sees them unchanged."""
    torch.manual_seed(0)
    s = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.linspace(0.5, 2.0, 5)
    value = (fn(s, t) * weights).sum()
    first = torch.autograd.grad(value, (s, t), retain_graph=True)
    second = torch.autograd.grad(value, (s, t))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b) and a.abs().sum() > 0
