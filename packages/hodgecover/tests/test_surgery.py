from __future__ import annotations

import pytest
import torch
from hodgecover.moe import find_moe_layers
from hodgecover.surgery import apply_redirect, merge_groups, prune_experts
from hodgecover_models import FAMILIES, moe_model
from transformers import AutoModelForCausalLM

from klcore.errors import ConfigError, DataError


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_all_experts_gives_identical_logits(family, tokens):
    model = moe_model(family, dtype=torch.float32)
    with torch.no_grad():
        before = model(tokens).logits
    prune_experts(model, {0: range(6), 1: range(6)})
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_matches_masked_routing_and_round_trips(family, tokens, tmp_path):
    model = moe_model(family)
    keep = {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}
    # independent reference: the unpruned model with dropped experts' router logits at -inf
    ref = moe_model(family)
    for moe in find_moe_layers(ref):
        inner = moe.router.forward
        drop = torch.tensor([i not in keep[moe.index] for i in range(6)])

        def masked(x, inner=inner, drop=drop, moe=moe):
            logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), moe.router.weight)
            logits = logits.masked_fill(drop, float("-inf"))
            probs = torch.softmax(logits.float(), -1)
            top_v, top_i = probs.topk(moe.top_k, -1)
            if getattr(moe.router, "norm_topk_prob", True) is not False:
                top_v = top_v / top_v.sum(-1, keepdim=True)
            return logits, top_v.to(logits.dtype), top_i

        moe.router.forward = masked
    with torch.no_grad():
        want = ref(tokens).logits
    prune_experts(model, keep)
    cfg = model.config
    assert (getattr(cfg, "num_local_experts", None) or cfg.num_experts) == 4
    assert all(m.num_experts == 4 and m.router.weight.shape[0] == 4 for m in find_moe_layers(model))
    with torch.no_grad():
        got = model(tokens).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    loaded.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, got)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # eager and the default fused expert kernel
def test_redirect_sends_tokens_of_dropped_experts_to_their_survivor(tokens, dtype):
    model = moe_model("mixtral", dtype=dtype)
    ref = moe_model("mixtral", dtype=dtype)
    keep = {0: [0, 1, 2], 1: [3, 4, 5]}
    redirect = {0: torch.tensor([0, 1, 2, 0, 1, 2]), 1: torch.tensor([0, 0, 1, 0, 1, 2])}
    # reference: copy each survivor's weights into the slots redirected to it, keep every router row
    with torch.no_grad():
        for moe in find_moe_layers(ref):
            for i in range(6):
                j = keep[moe.index][int(redirect[moe.index][i])]
                moe.experts.gate_up_proj[i] = moe.experts.gate_up_proj[j]
                moe.experts.down_proj[i] = moe.experts.down_proj[j]
        want = ref(tokens).logits
    apply_redirect(model, keep, redirect)
    assert all(m.experts.num_experts == 3 for m in find_moe_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, want)


def test_merge_groups_puts_the_weighted_mean_in_the_most_frequent_slot(tokens):
    model = moe_model("qwen3_moe")
    original = find_moe_layers(model)[0].experts.down_proj.detach().clone()
    freq = torch.tensor([0.1, 0.3, 0.2, 0.0, 0.4, 0.2])
    groups = {0: [[0, 1], [2, 3], [4, 5]], 1: [[0], [1, 2], [3, 4, 5]]}
    merge_groups(model, groups, {0: freq, 1: freq})
    d = find_moe_layers(model)[0].experts.down_proj
    torch.testing.assert_close(d[0], (0.1 * original[0] + 0.3 * original[1]) / 0.4)
    torch.testing.assert_close(d[1], original[2])  # 3 has zero frequency: weight 0
    torch.testing.assert_close(d[2], (0.4 * original[4] + 0.2 * original[5]) / 0.6)


def test_bad_keep_sets_raise():
    model = moe_model("olmoe")
    with pytest.raises(ConfigError):
        prune_experts(model, {0: [0, 1, 2], 1: [0, 1]})
    with pytest.raises(ConfigError):
        prune_experts(model, {0: [0], 1: [1]})
    with pytest.raises(DataError):
        prune_experts(model, {0: [0, 1]})
    with pytest.raises(DataError):
        prune_experts(model, {0: [0, 7], 1: [0, 1]})
