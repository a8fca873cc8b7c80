"""Sampling with the KV cache: shapes, EOS handling, behaviour log-probs, greedy, top-p."""

from __future__ import annotations

import pytest
import torch

from klcore.errors import ConfigError, DataError
from klcore.rollout import _top_p_filter, is_sharded, left_pad, sample
from klcore.trainer.grpo import policy_forward


def _batch(roll) -> dict[str, torch.Tensor]:
    return {
        "input_ids": roll.input_ids, "attention_mask": roll.attention_mask,
        "position_ids": roll.position_ids, "responses": roll.responses,
    }


PROMPTS = [[1, 5, 6, 14, 7, 17], [1, 9, 14, 8, 17], [1, 6, 17]]  # different lengths: left padding matters


def test_shapes_groups_and_eos(tiny_model) -> None:
    roll = sample(tiny_model, PROMPTS, group_size=3, max_new_tokens=6, eos_token_id=2, pad_token_id=0,
                  generator=torch.Generator().manual_seed(0))
    n, r = roll.response_mask.shape
    assert n == 9 and r <= 6 and roll.prompt_length == 6
    assert roll.input_ids.shape == (9, 6 + r) and roll.logprobs.shape == (9, r)
    for i in range(n):  # rows are grouped by prompt, left padded
        prompt = PROMPTS[i // 3]
        assert roll.input_ids[i, 6 - len(prompt) : 6].tolist() == prompt
        assert roll.attention_mask[i, : 6 - len(prompt)].sum() == 0
        resp, mask = roll.responses[i].tolist(), roll.response_mask[i].tolist()
        if 2 in resp:  # the mask covers up to and including the first EOS, pad after it
            k = resp.index(2)
            assert mask == [True] * (k + 1) + [False] * (r - k - 1)
            assert all(t == 0 for t in resp[k + 1 :])
        else:
            assert all(mask)
    assert (roll.logprobs[~roll.response_mask] == 0).all() and (roll.logprobs[roll.response_mask] < 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_a_full_forward(tiny_model, temperature: float) -> None:
    roll = sample(tiny_model, PROMPTS, group_size=2, max_new_tokens=5, eos_token_id=2, pad_token_id=0,
                  temperature=temperature, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        recomputed, _ = policy_forward(tiny_model, _batch(roll), temperature)
    m = roll.response_mask
    torch.testing.assert_close(roll.logprobs[m], recomputed[m], rtol=1e-4, atol=1e-5)


def test_greedy_is_argmax_and_deterministic(tiny_model) -> None:
    a = sample(tiny_model, PROMPTS, max_new_tokens=4, eos_token_id=2, pad_token_id=0, greedy=True)
    b = sample(tiny_model, PROMPTS, max_new_tokens=4, eos_token_id=2, pad_token_id=0, greedy=True)
    assert torch.equal(a.input_ids, b.input_ids)
    with torch.no_grad():
        logits = tiny_model(input_ids=a.input_ids, attention_mask=a.attention_mask, position_ids=a.position_ids).logits
    pred = logits[:, a.prompt_length - 1 : -1].argmax(-1)
    assert torch.equal(pred[a.response_mask], a.responses[a.response_mask])


def test_seeded_sampling_is_reproducible(tiny_model) -> None:
    kw = dict(group_size=4, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    a = sample(tiny_model, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    b = sample(tiny_model, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.input_ids, b.input_ids)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    for p, kept in [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)]:
        out = _top_p_filter(logits, p)
        assert int(torch.isfinite(out[0]).sum()) == kept, p
        assert torch.equal(torch.isfinite(out[1]), torch.isfinite(out[0]).flip(-1))


def test_top_p_sampling_never_leaves_the_nucleus(tiny_model) -> None:
    roll = sample(tiny_model, [[1, 5]], group_size=64, max_new_tokens=1, eos_token_id=2, pad_token_id=0,
                  top_p=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = tiny_model(input_ids=torch.tensor([[1, 5]])).logits[0, -1].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.3).sum()) + 1].tolist())
    assert set(roll.responses[:, 0].tolist()) <= nucleus


def test_bad_arguments(tiny_model) -> None:
    kw = dict(max_new_tokens=2, eos_token_id=2, pad_token_id=0)
    with pytest.raises(ConfigError):
        sample(tiny_model, PROMPTS, group_size=0, **kw)
    with pytest.raises(ConfigError):
        sample(tiny_model, PROMPTS, temperature=0.0, **kw)
    with pytest.raises(ConfigError):
        sample(tiny_model, PROMPTS, top_p=1.5, **kw)
    with pytest.raises(DataError):
        sample(tiny_model, [[1, 2], []], **kw)
    with pytest.raises(DataError):
        left_pad([], 0)


def test_inverse_cdf_draws_follow_the_distribution() -> None:
    from klcore.rollout import _draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(20000, 1)
    tok = _draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=5).float() / tok.numel()
    assert freq[0] == 0 and freq[2] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def test_two_stage_draw_equals_one_float64_cumsum() -> None:
    """The blocked inverse CDF picks the token a single float64 cumsum over the vocabulary picks, for the
    same uniforms: vocabularies across several blocks, tiny and zero probabilities, zero blocks, a zero tail."""
    from klcore.rollout import DRAW_BLOCK, _draw

    g = torch.Generator().manual_seed(3)
    vocab = 5 * DRAW_BLOCK + 77
    logits = torch.randn(400, vocab, generator=g) * 6
    logits[:50, DRAW_BLOCK : 2 * DRAW_BLOCK] = -float("inf")  # a whole block without mass
    logits[50:100, -500:] = -float("inf")  # a zero tail
    logits[100:150, :] = -40.0
    logits[100:150, 7] = 0.0  # nearly all mass on one token, the rest tiny
    probs = logits.softmax(-1)
    got = _draw(probs, torch.Generator().manual_seed(11))
    u = torch.rand((400, 1), generator=torch.Generator().manual_seed(11)).double()
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    assert torch.equal(got, expected)
    assert (probs.gather(1, got[:, None]) > 0).all()


def test_group_prefill_once_equals_repeated_prompts(tiny_model) -> None:
    """Prefilling each prompt once and repeating its cache gives the rollout of a batch that repeats it."""
    kw = dict(max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    grouped = sample(tiny_model, PROMPTS, group_size=3, generator=torch.Generator().manual_seed(5), **kw)
    repeated = sample(tiny_model, [p for p in PROMPTS for _ in range(3)], group_size=1,
                      generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(grouped.input_ids, repeated.input_ids)
    assert torch.equal(grouped.response_mask, repeated.response_mask)
    torch.testing.assert_close(grouped.logprobs, repeated.logprobs, rtol=1e-5, atol=1e-6)


def test_unsharded_model_and_synced_flag_on_one_process(tiny_model) -> None:
    assert not is_sharded(tiny_model)
    kw = dict(group_size=2, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    a = sample(tiny_model, PROMPTS, generator=torch.Generator().manual_seed(4), **kw)
    b = sample(tiny_model, PROMPTS, generator=torch.Generator().manual_seed(4), synced=True, **kw)
    assert torch.equal(a.input_ids, b.input_ids)  # without a process group there is nobody to wait for
