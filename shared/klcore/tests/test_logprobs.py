"""Per-token log-probs and entropies (from logits or from hidden states) against float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from klcore.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from klcore.logprobs import (
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
    token_logprobs_from_hidden,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def ref_logprobs_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """float64 log softmax(logits / T)[token] and -sum p log p, written out per position."""
    z = logits.detach().double() / temperature
    lead = z.shape[:-1]
    flat_z, flat_t = z.reshape(-1, z.shape[-1]), tokens.reshape(-1)
    lps, ents = [], []
    for row, tok in zip(flat_z, flat_t.tolist()):
        shift = row - row.max()
        log_norm = torch.log(torch.exp(shift).sum())
        logp = shift - log_norm
        lps.append(logp[tok])
        ents.append(-(torch.exp(logp) * logp).sum())
    return torch.stack(lps).reshape(lead), torch.stack(ents).reshape(lead)


def _inputs(shape=(2, 5), vocab=11, dtype=torch.float32, scale=2.0):
    logits = (torch.randn(*shape, vocab, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, vocab, shape)
    return logits, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("vocab", [3, 20, 50])
def test_logprobs_and_entropy_match_brute_force(dtype: torch.dtype, vocab: int) -> None:
    logits, tokens = _inputs(vocab=vocab, dtype=dtype)
    ref_lp, ref_ent = ref_logprobs_entropy(logits, tokens)
    lp = token_logprobs(logits, tokens)
    ent = token_entropy(logits)
    lp2, ent2 = token_logprobs_and_entropy(logits, tokens)
    for out, ref in ((lp, ref_lp), (ent, ref_ent), (lp2, ref_lp), (ent2, ref_ent)):
        assert out.dtype == torch.float32 and out.shape == tokens.shape
        torch.testing.assert_close(out.double(), ref, **TOL)
    assert logits.dtype == dtype  # the input is not modified in place


def test_known_values() -> None:
    """Uniform logits: log p = -log V and entropy log V; one-hot-ish logits: entropy ~ 0."""
    v = 7
    logits = torch.zeros(1, 3, v)
    tokens = torch.tensor([[0, 3, 6]])
    torch.testing.assert_close(token_logprobs(logits, tokens), torch.full((1, 3), -math.log(v)), rtol=0, atol=1e-6)
    torch.testing.assert_close(token_entropy(logits), torch.full((1, 3), math.log(v)), rtol=0, atol=1e-6)
    peaked = torch.full((1, 1, v), -40.0)
    peaked[0, 0, 2] = 40.0
    torch.testing.assert_close(token_entropy(peaked), torch.zeros(1, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(token_logprobs(peaked, torch.tensor([[2]])), torch.zeros(1, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.0, 2.0, 3])
def test_temperature(temperature: float) -> None:
    logits, tokens = _inputs(shape=(3, 4), vocab=9)
    ref_lp, ref_ent = ref_logprobs_entropy(logits, tokens, temperature)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=temperature).double(), ref_lp, **TOL)
    torch.testing.assert_close(token_entropy(logits, temperature=temperature).double(), ref_ent, **TOL)
    lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=temperature)
    torch.testing.assert_close(lp.double(), ref_lp, **TOL)
    torch.testing.assert_close(ent.double(), ref_ent, **TOL)
    if temperature != 1.0:  # the parameter really changes the result
        assert not torch.allclose(lp, token_logprobs(logits, tokens))


def test_extra_leading_dims_and_non_contiguous() -> None:
    logits, tokens = _inputs(shape=(2, 3, 4), vocab=6)
    ref_lp, ref_ent = ref_logprobs_entropy(logits, tokens)
    torch.testing.assert_close(token_logprobs(logits, tokens).double(), ref_lp, **TOL)
    lt, tt = logits.transpose(0, 1), tokens.transpose(0, 1)
    assert not lt.is_contiguous()
    torch.testing.assert_close(token_logprobs(lt, tt).double(), ref_lp.transpose(0, 1), **TOL)
    torch.testing.assert_close(token_entropy(lt).double(), ref_ent.transpose(0, 1), **TOL)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_chunked_equals_unchunked(chunk_size: int | None) -> None:
    logits, tokens = _inputs(shape=(3, 5), vocab=13, dtype=torch.bfloat16)
    full_lp = token_logprobs(logits, tokens)
    full_ent = token_entropy(logits)
    tight = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(token_logprobs(logits, tokens, chunk_size=chunk_size), full_lp, **tight)
    torch.testing.assert_close(token_entropy(logits, chunk_size=chunk_size), full_ent, **tight)
    lp, ent = token_logprobs_and_entropy(logits, tokens, chunk_size=chunk_size, temperature=0.8)
    ref_lp, ref_ent = ref_logprobs_entropy(logits, tokens, 0.8)
    torch.testing.assert_close(lp.double(), ref_lp, **TOL)
    torch.testing.assert_close(ent.double(), ref_ent, **TOL)


def _ref_autograd(logits0: torch.Tensor, tokens: torch.Tensor, w_lp: torch.Tensor, w_ent: torch.Tensor, temp: float):
    """Gradient w.r.t. the logits of sum(w_lp * logp + w_ent * entropy), in float64 by autograd."""
    z = logits0.double().requires_grad_()
    logp = torch.log_softmax(z / temp, -1)
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    (w_lp.double() * lp + w_ent.double() * ent).sum().backward()
    return z.grad


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_and_checkpoint(temperature: float) -> None:
    logits0, tokens = _inputs(shape=(3, 4), vocab=8)
    w_lp, w_ent = torch.randn(3, 4), torch.randn(3, 4)

    def run(**kw):
        x = logits0.clone().requires_grad_()
        lp, ent = token_logprobs_and_entropy(x, tokens, temperature=temperature, **kw)
        (w_lp * lp + w_ent * ent).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    def run_separate(**kw):
        x = logits0.clone().requires_grad_()
        lp = token_logprobs(x, tokens, temperature=temperature, **kw)
        ent = token_entropy(x, temperature=temperature, **kw)
        (w_lp * lp + w_ent * ent).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    base = run()
    torch.testing.assert_close(
        base[2].double(), _ref_autograd(logits0, tokens, w_lp, w_ent, temperature), rtol=1e-4, atol=1e-6
    )
    for runner in (run, run_separate):
        for kw in ({"checkpoint": True}, {"checkpoint": True, "chunk_size": 5}, {"chunk_size": 1}, {}):
            got = runner(**kw)
            torch.testing.assert_close(got[:2], base[:2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[2], base[2], rtol=1e-4, atol=1e-5)  # summation order may differ


def test_bf16_logits_gradient_is_bf16_and_close() -> None:
    logits0, tokens = _inputs(shape=(2, 3), vocab=10, dtype=torch.bfloat16)
    x = logits0.clone().requires_grad_()
    lp = token_logprobs(x, tokens, checkpoint=True, chunk_size=2)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ref = _ref_autograd(logits0, tokens, torch.ones(2, 3), torch.zeros(2, 3), 1.0)
    torch.testing.assert_close(x.grad.double(), ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- from hidden states


def _head(kind: str, hidden_size: int, vocab: int):
    if kind == "weight":
        w = torch.randn(vocab, hidden_size)
        return w, w, None
    lin = nn.Linear(hidden_size, vocab, bias=kind == "linear_bias")
    with torch.no_grad():
        lin.weight.normal_()
        if lin.bias is not None:
            lin.bias.normal_()
    return lin, lin.weight, lin.bias


@pytest.mark.parametrize("kind", ["linear_bias", "linear_nobias", "weight"])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_from_hidden_matches_brute_force(kind: str, with_entropy: bool, temperature: float) -> None:
    hidden_size, vocab = 6, 17
    head, w, b = _head(kind, hidden_size, vocab)
    hidden = torch.randn(2, 4, hidden_size)
    tokens = torch.randint(0, vocab, (2, 4))
    logits64 = hidden.double() @ w.detach().double().T
    if b is not None:
        logits64 = logits64 + b.detach().double()
    ref_lp, ref_ent = ref_logprobs_entropy(logits64, tokens, temperature)
    for cs in (None, 1, 3):
        out = token_logprobs_from_hidden(
            hidden, head, tokens, with_entropy=with_entropy, chunk_size=cs, temperature=temperature
        )
        if with_entropy:
            assert isinstance(out, tuple) and len(out) == 2
            lp, ent = out
            assert ent.dtype == torch.float32
            torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
        else:
            assert isinstance(out, torch.Tensor)
            lp = out
        assert lp.dtype == torch.float32 and lp.shape == (2, 4)
        torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["linear_bias", "weight"])
def test_from_hidden_gradients_and_checkpoint(kind: str) -> None:
    hidden_size, vocab = 5, 12
    head0, w0, b0 = _head(kind, hidden_size, vocab)
    hidden0 = torch.randn(3, 4, hidden_size)
    tokens = torch.randint(0, vocab, (3, 4))
    w_lp, w_ent = torch.randn(3, 4), torch.randn(3, 4)

    # float64 reference by autograd on the explicit formula
    h64 = hidden0.double().requires_grad_()
    W64 = w0.detach().double().requires_grad_()
    z = h64 @ W64.T
    b64 = None
    if b0 is not None:
        b64 = b0.detach().double().requires_grad_()
        z = z + b64
    logp = torch.log_softmax(z, -1)
    lp64 = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent64 = -(logp.exp() * logp).sum(-1)
    (w_lp.double() * lp64 + w_ent.double() * ent64).sum().backward()

    def run(**kw):
        hidden = hidden0.clone().requires_grad_()
        if kind == "weight":
            head = w0.detach().clone().requires_grad_()
            params = [head]
        else:
            head = nn.Linear(hidden_size, vocab)
            head.load_state_dict(head0.state_dict())
            params = [head.weight, head.bias]
        lp, ent = token_logprobs_from_hidden(hidden, head, tokens, with_entropy=True, **kw)
        (w_lp * lp + w_ent * ent).sum().backward()
        return [lp.detach(), ent.detach(), hidden.grad] + [p.grad for p in params]

    base = run()
    torch.testing.assert_close(base[2].double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base[3].double(), W64.grad, rtol=1e-4, atol=1e-5)
    if b64 is not None:
        torch.testing.assert_close(base[4].double(), b64.grad, rtol=1e-4, atol=1e-5)
    for kw in ({"checkpoint": True}, {"checkpoint": True, "chunk_size": 5}, {"chunk_size": 1}):
        got = run(**kw)
        assert len(got) == len(base)
        # chunked matmuls sum in another order: float32 rounding of logits of magnitude ~10
        torch.testing.assert_close(got[:2], base[:2], rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(got[2:], base[2:], rtol=1e-4, atol=2e-5)


def test_from_hidden_head_gradient_with_frozen_hidden_and_checkpoint() -> None:
    """Only the head trains (hidden has no grad): checkpointing must still give the right head gradient."""
    hidden = torch.randn(2, 3, 4)
    tokens = torch.randint(0, 7, (2, 3))
    grads = []
    for ckpt in (False, True):
        head = torch.nn.Linear(4, 7)
        torch.manual_seed(1)
        with torch.no_grad():
            head.weight.normal_()
            head.bias.normal_()
        token_logprobs_from_hidden(hidden, head, tokens, checkpoint=ckpt, chunk_size=2).sum().backward()
        grads.append((head.weight.grad, head.bias.grad))
    for a, b in zip(*grads):
        assert a is not None and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _saved_bytes(fn) -> int:
    """Bytes of all tensors autograd saves for backward while ``fn`` runs (deterministic, not timing)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("hidden_needs_grad", [True, False])  # False: only the head is trainable
def test_from_hidden_checkpoint_keeps_no_logits_for_backward(hidden_needs_grad: bool) -> None:
    n, hidden_size, vocab, chunk = 64, 8, 1000, 16
    hidden = torch.randn(n, hidden_size, requires_grad=hidden_needs_grad)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,))
    logits_bytes = n * vocab * 4
    plain = _saved_bytes(lambda: token_logprobs_from_hidden(hidden, weight, tokens, chunk_size=chunk))
    assert plain >= logits_bytes  # control: without checkpointing the float32 logits are kept
    ckpt = _saved_bytes(lambda: token_logprobs_from_hidden(hidden, weight, tokens, chunk_size=chunk, checkpoint=True))
    assert ckpt < logits_bytes / 8


def test_from_hidden_bf16_hidden() -> None:
    hidden = torch.randn(2, 3, 8).to(torch.bfloat16)
    w = torch.randn(10, 8).to(torch.bfloat16)
    tokens = torch.randint(0, 10, (2, 3))
    lp = token_logprobs_from_hidden(hidden, w, tokens)
    assert lp.dtype == torch.float32
    # the bf16 matmul output is rounded to bf16 before the float32 softmax: compare loosely
    ref_lp, _ = ref_logprobs_entropy(hidden.double() @ w.double().T, tokens)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=5e-2, atol=1e-1)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_tokens() -> None:
    logits = torch.randn(2, 3, 5)
    good = torch.randint(0, 5, (2, 3))
    for fn in (token_logprobs, token_logprobs_and_entropy):
        with pytest.raises(ShapeError):
            fn(logits, torch.full((2, 3), 5))
        with pytest.raises(ShapeError):
            fn(logits, torch.full((2, 3), -1))
        with pytest.raises(DTypeError):
            fn(logits, good.float())
        with pytest.raises(DTypeError):
            fn(logits, good.bool())
        with pytest.raises(DTypeError):
            fn(logits, good.tolist())
        with pytest.raises(ShapeError):
            fn(logits, torch.randint(0, 5, (3, 2)))
        with pytest.raises(ShapeError):
            fn(logits, torch.randint(0, 5, (2, 3, 1)))
        fn(logits, good.int())  # int32 ids are accepted


def test_bad_logits() -> None:
    tokens = torch.randint(0, 5, (2, 3))
    logits = torch.randn(2, 3, 5)
    for bad in (float("nan"), float("inf")):
        x = logits.clone()
        x[1, 2, 0] = bad
        for call in (
            lambda x=x: token_logprobs(x, tokens),
            lambda x=x: token_entropy(x),
            lambda x=x: token_logprobs_and_entropy(x, tokens),
        ):
            with pytest.raises(NonFiniteError):
                call()
    with pytest.raises(ShapeError):
        token_logprobs(torch.randn(5), torch.tensor(1))
    with pytest.raises(ShapeError):
        token_entropy(torch.randn(5))
    with pytest.raises(DTypeError):
        token_entropy(torch.randint(0, 3, (2, 3, 5)))
    with pytest.raises(DTypeError):
        token_logprobs(torch.randint(0, 3, (2, 3, 5)), tokens)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), "1.0", None])
def test_bad_temperature(temperature) -> None:
    logits = torch.randn(2, 3, 5)
    tokens = torch.randint(0, 5, (2, 3))
    with pytest.raises(ConfigError):
        token_logprobs(logits, tokens, temperature=temperature)
    with pytest.raises(ConfigError):
        token_entropy(logits, temperature=temperature)
    with pytest.raises(ConfigError):
        token_logprobs_and_entropy(logits, tokens, temperature=temperature)
    with pytest.raises(ConfigError):
        token_logprobs_from_hidden(torch.randn(2, 3, 4), torch.randn(5, 4), tokens, temperature=temperature)


def test_bad_hidden_and_head() -> None:
    tokens = torch.randint(0, 5, (2, 3))
    hidden = torch.randn(2, 3, 4)
    with pytest.raises(ShapeError):
        token_logprobs_from_hidden(hidden, nn.Linear(6, 5), tokens)
    with pytest.raises(ShapeError):
        token_logprobs_from_hidden(hidden, torch.randn(5, 6), tokens)
    with pytest.raises(ShapeError):
        token_logprobs_from_hidden(hidden, nn.ReLU(), tokens)  # no .weight
    with pytest.raises(ShapeError):
        token_logprobs_from_hidden(torch.randn(4), torch.randn(5, 4), torch.tensor(0))
    with pytest.raises(ShapeError):
        token_logprobs_from_hidden(hidden, torch.randn(5, 4), torch.full((2, 3), 5))
    with pytest.raises(ShapeError):
        token_logprobs_from_hidden(hidden, torch.randn(5, 4), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(DTypeError):
        token_logprobs_from_hidden(hidden, torch.randn(5, 4), tokens.float())
    with pytest.raises(DTypeError):
        token_logprobs_from_hidden(hidden.long(), torch.randn(5, 4), tokens)
    bad = hidden.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        token_logprobs_from_hidden(bad, torch.randn(5, 4), tokens)


def test_minus_inf_logits_entropy_and_logprob() -> None:
    logits = torch.tensor([[[1.0, float("-inf"), 2.0, float("-inf")]]], requires_grad=True)
    tokens = torch.tensor([[2]])
    lp, ent = token_logprobs_and_entropy(logits, tokens)
    p = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), -1)
    assert float(lp.detach()) == pytest.approx(float(p[1].log()), rel=1e-6)
    assert float(ent.detach()) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert float(token_entropy(logits).detach()) == pytest.approx(float(ent.detach()), rel=1e-6)
    (lp + ent).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_minus_inf_entropy_without_autograd_matches_with() -> None:
    logits = torch.randn(3, 5, 40)
    logits[0, 1, :7] = float("-inf")
    logits[2, 4, 30:] = float("-inf")
    with torch.no_grad():
        fast = token_entropy(logits, chunk_size=4)
    guarded = token_entropy(logits.clone().requires_grad_(), chunk_size=4)
    torch.testing.assert_close(fast, guarded.detach(), rtol=1e-6, atol=1e-6)
    p = torch.softmax(logits.double(), -1)
    ref = -(p * torch.where(p > 0, p.log(), torch.zeros((), dtype=torch.float64))).sum(-1)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NonFiniteError):  # a real NaN is still an error
        bad = logits.clone()
        bad[1, 1, 3] = float("nan")
        with torch.no_grad():
            token_entropy(bad)
