from __future__ import annotations

import pytest
import torch
from hodgecover.moe import find_moe_layers
from hodgecover.redirect_checkpoint import REDIRECT_FILE, load_redirected, save_redirected
from hodgecover.surgery import RedirectRouter, apply_redirect, merge_groups, prune_experts
from hodgecover_models import ALL_FAMILIES, FAMILIES, moe_model
from transformers import AutoModelForCausalLM

from klcore.errors import CheckpointError, ConfigError, DataError


@pytest.mark.parametrize("family", ALL_FAMILIES)
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


def _ernie_masked(moe, drop):
    """Ernie-4.5 routing with dropped experts' logits at -inf: softmax, top-k of probs + bias, renormalise."""
    statics = moe.router.moe_statics

    def forward(x):
        logits = torch.nn.functional.linear(x.float(), moe.router.weight.float()).masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, -1)
        _, ids = torch.topk(probs + statics.e_score_correction_bias.squeeze(), moe.top_k, dim=-1)
        w = probs.gather(-1, ids)
        return logits, (w / w.sum(-1, keepdim=True).clamp_min(moe.router.norm_min)).to(x.dtype), ids

    return forward


def test_ernie_prune_slices_the_nested_score_correction_bias(tokens, tmp_path):
    model, ref = moe_model("ernie4_5_moe"), moe_model("ernie4_5_moe")
    keep = {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}
    for moe in find_moe_layers(ref):
        moe.router.forward = _ernie_masked(moe, torch.tensor([i not in keep[moe.index] for i in range(6)]))
    bias = find_moe_layers(model)[0].router.moe_statics.e_score_correction_bias.detach().clone()
    with torch.no_grad():
        want = ref(tokens).logits
    prune_experts(model, keep)
    moe0 = find_moe_layers(model)[0]
    assert torch.equal(moe0.router.moe_statics.e_score_correction_bias, bias[:, keep[0]])
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, want)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    loaded.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, got)


def test_deepseek_v3_prune_keeps_group_routing(tokens, tmp_path):
    model, ref = moe_model("deepseek_v3"), moe_model("deepseek_v3")
    keep = {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}  # two survivors in each original group of three
    with torch.no_grad():  # reference: dropped experts never chosen (bias -inf), groups unchanged
        for moe in find_moe_layers(ref):
            for i in range(6):
                if i not in keep[moe.index]:
                    moe.router.e_score_correction_bias[i] = float("-inf")
        want = ref(tokens).logits
    prune_experts(model, keep)
    assert model.config.n_routed_experts == 4
    assert all(m.router.e_score_correction_bias.shape == (4,) for m in find_moe_layers(model))
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, want)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    loaded.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, got)


def test_deepseek_v3_group_counts_are_checked_before_any_change(tokens):
    model = moe_model("deepseek_v3")
    with torch.no_grad():
        before = model(tokens).logits
    with pytest.raises(ConfigError, match="n_group=2"):  # 3 survivors cannot form 2 equal groups
        prune_experts(model, {0: [0, 1, 2], 1: [0, 1, 2]})
    with pytest.raises(ConfigError, match="top 2"):  # groups of one expert
        prune_experts(model, {0: [0, 3], 1: [0, 3]})
    assert all(m.num_experts == 6 for m in find_moe_layers(model))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    with pytest.warns(UserWarning, match="uneven"):
        prune_experts(model, {0: [0, 1, 2, 3], 1: [1, 2, 4, 5]})


def _tied_reference(family, keep, redirect, dtype=torch.float64):
    """The unpruned model with each slot overwritten by the weights of the survivor it is redirected to."""
    ref = moe_model(family, dtype=dtype)
    with torch.no_grad():
        for moe in find_moe_layers(ref):
            source = torch.tensor(keep[moe.index])[redirect[moe.index]]
            for p in moe.expert_parameters().values():
                p.copy_(p[source].clone())
    return ref


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_redirected_model_saves_as_a_stock_checkpoint_with_identical_logits(family, tokens, tmp_path):
    keep = {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}
    redirect = {0: torch.tensor([0, 0, 1, 2, 2, 3]), 1: torch.tensor([1, 0, 1, 2, 2, 3])}
    model = apply_redirect(moe_model(family), keep, redirect)
    with torch.no_grad():
        got = model(tokens).logits
        want = _tied_reference(family, keep, redirect)(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    model.save_pretrained(tmp_path / "stock")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float64).eval()
    loaded.set_experts_implementation("eager")
    assert all(m.num_experts == 6 and not isinstance(m.router, RedirectRouter) for m in find_moe_layers(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, got, rtol=1e-12, atol=1e-12)
    save_redirected(model, tmp_path / "compact")
    compact = load_redirected(tmp_path / "compact", dtype=torch.float64).eval()
    compact.set_experts_implementation("eager")
    assert all(m.num_experts == 4 and isinstance(m.router, RedirectRouter) for m in find_moe_layers(compact))
    with torch.no_grad():
        torch.testing.assert_close(compact(tokens).logits, got, rtol=1e-12, atol=1e-12)


def test_load_redirected_refuses_a_redirect_file_of_another_save(tmp_path):
    keep = {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}
    redirect = {0: torch.tensor([0, 0, 1, 2, 2, 3]), 1: torch.tensor([1, 0, 1, 2, 2, 3])}
    save_redirected(apply_redirect(moe_model("olmoe"), keep, redirect), tmp_path / "a")
    other = {0: torch.tensor([0, 1, 1, 2, 3, 3]), 1: torch.tensor([0, 0, 1, 1, 2, 3])}
    save_redirected(apply_redirect(moe_model("olmoe"), keep, other), tmp_path / "b")
    (tmp_path / "a" / REDIRECT_FILE).replace(tmp_path / "b" / REDIRECT_FILE)
    with pytest.raises(CheckpointError, match="tied survivor weights"):
        load_redirected(tmp_path / "b", dtype=torch.float64)
    with pytest.raises(CheckpointError, match="save_redirected"):
        load_redirected(tmp_path / "a", dtype=torch.float64)


def test_hc_smoe_binds_every_member_slot_to_its_merged_expert(tokens):
    freq = torch.tensor([0.1, 0.3, 0.2, 0.0, 0.4, 0.2])
    groups = {0: [[0, 1], [2, 3], [4, 5]], 1: [[0], [1, 2], [3, 4, 5]]}
    ref = moe_model("mixtral")
    with torch.no_grad():  # reference: every member's slot holds the group's weighted mean, all rows kept
        for moe in find_moe_layers(ref):
            for p in moe.expert_parameters().values():
                for g in groups[moe.index]:
                    w = freq[g] / freq[g].sum()
                    p[g] = torch.einsum("a,a...->...", w.double(), p[g]).unsqueeze(0).clone()
        want = ref(tokens).logits
    model = merge_groups(moe_model("mixtral"), groups, {0: freq, 1: freq})
    assert all(m.num_experts == 3 and m.router.weight.shape[0] == 6 for m in find_moe_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, want)
    unbound = merge_groups(moe_model("mixtral"), groups, {0: freq, 1: freq}, bind_slots=False)
    assert all(m.router.weight.shape[0] == 3 for m in find_moe_layers(unbound))
