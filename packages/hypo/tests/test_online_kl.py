"""The RLOO surrogate's expected gradient equals the exact gradient of the sequence KL (exhaustive enumeration)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypo import rloo_kl_surrogate, sequence_log_ratio

from klcore.errors import ConfigError, MaskError, ShapeError

VOCAB, EOS = 3, 0


def _token_logprobs(logits: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs ``[N, L]`` of a tabular autoregressive policy: logits ``[L, V + 1, V]`` indexed
    by (position, previous token or V at the start, next token)."""
    prev = torch.cat([torch.full((seqs.shape[0], 1), VOCAB), seqs[:, :-1]], dim=1)
    pos = torch.arange(seqs.shape[1]).expand_as(seqs)
    table = torch.log_softmax(logits, dim=-1)
    return table[pos, prev, seqs]


def _completions(with_eos: bool, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct completion (tokens ``[M, L]``, mask ``[M, L]``): generation stops after EOS."""
    seen: dict[tuple[int, ...], tuple[list[int], list[bool]]] = {}
    for grid in itertools.product(range(VOCAB), repeat=length):
        mask, alive = [], True
        for tok in grid:
            mask.append(alive)
            alive = alive and not (with_eos and tok == EOS)
        key = tuple(t for t, m in zip(grid, mask) if m)
        seen.setdefault(key, ([t if m else EOS for t, m in zip(grid, mask)], mask))
    toks, masks = zip(*seen.values())
    return torch.tensor(toks), torch.tensor(masks)


@pytest.mark.parametrize(("with_eos", "k", "length"), [(False, 2, 3), (True, 2, 3), (True, 3, 2)])
def test_expected_surrogate_gradient_is_exact_kl_gradient(with_eos: bool, k: int, length: int) -> None:
    torch.manual_seed(0)
    theta = torch.randn(length, VOCAB + 1, VOCAB, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(length, VOCAB + 1, VOCAB, dtype=torch.float64)
    seqs, mask = _completions(with_eos, length)
    m = mask.double()

    # exact: KL(pi || ref) = sum_y pi(y) (log pi(y) - log ref(y)) over every completion
    logp = (_token_logprobs(theta, seqs) * m).sum(-1)
    ref_logp = (_token_logprobs(ref, seqs) * m).sum(-1)
    assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-12)  # the enumeration is complete
    kl = (torch.exp(logp) * (logp - ref_logp)).sum()
    (exact,) = torch.autograd.grad(kl, theta)

    # expectation of the surrogate's gradient: every k-tuple of completions weighted by its probability
    coef = 0.7
    tuples = torch.tensor(list(itertools.product(range(seqs.shape[0]), repeat=k)))  # [M^k, k]
    weights = torch.exp(logp.detach())[tuples].prod(-1)
    expected = torch.zeros_like(theta)
    tok_logp = _token_logprobs(theta, seqs)
    tok_ref = _token_logprobs(ref, seqs)
    for start in range(0, tuples.shape[0], 64):  # a chunk of tuples = a batch of prompts, k rows each
        idx = tuples[start : start + 64].reshape(-1)
        loss, _ = rloo_kl_surrogate(tok_logp[idx], tok_ref[idx], mask[idx], group_size=k, coef=coef)
        # the surrogate averages over the chunk's prompts: undo that and weight each prompt's term
        n = idx.shape[0] // k
        per_prompt = []
        for j in range(n):
            rows = idx[j * k : (j + 1) * k]
            term, _ = rloo_kl_surrogate(tok_logp[rows], tok_ref[rows], mask[rows], group_size=k, coef=coef)
            per_prompt.append(term)
        chunk = torch.stack(per_prompt)
        assert loss.item() == pytest.approx(chunk.mean().item(), abs=1e-6)
        (g,) = torch.autograd.grad((weights[start : start + n].float() * chunk).sum(), theta, retain_graph=True)
        expected += g
    torch.testing.assert_close(expected, coef * exact, rtol=1e-4, atol=1e-6)


def test_leave_one_out_values_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -0.5], [-2.0, -2.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    r = [(-1 + 1.5) + (-2 + 1), 0.0, (-3 + 2) + (-1 + 2), (-2 + 1) * 2]  # [-0.5, 0, 0, -2]
    adv = [r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]]
    seq = [-3.0, -0.5, -4.0, -4.0]
    loss, metrics = rloo_kl_surrogate(logp, ref, mask, group_size=2, coef=2.0)
    assert loss.item() == pytest.approx(2.0 * sum(a * s for a, s in zip(adv, seq)) / 4)
    assert metrics["kl/online"] == pytest.approx(sum(r) / 4)
    torch.testing.assert_close(sequence_log_ratio(logp, ref, mask), torch.tensor(r))
    loss.backward()
    torch.testing.assert_close(logp.grad, 2.0 * torch.tensor(adv)[:, None] * mask / 4)


def test_bad_inputs_raise() -> None:
    x = torch.zeros(4, 3)
    mask = torch.ones(4, 3)
    with pytest.raises(ConfigError, match="k\\) >= 2"):
        rloo_kl_surrogate(x, x, mask, group_size=1)
    with pytest.raises(ShapeError, match="multiple of group_size"):
        rloo_kl_surrogate(x, x, mask, group_size=3)
    with pytest.raises(ShapeError, match="ref_log_prob"):
        rloo_kl_surrogate(x, torch.zeros(4, 2), mask, group_size=2)
    with pytest.raises(MaskError):
        rloo_kl_surrogate(x, x, torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 1]]), group_size=2)
