from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hodgecover.barriers import BarrierCache, BarrierConfig, BarrierEngine, candidate_triangles, weight_fingerprint
from hodgecover.moe import find_moe_layers, merge_operator, merged
from hodgecover_models import FAMILIES, moe_model

from klcore.errors import CheckpointError, ConfigError, DataError, NonFiniteError, ShapeError, UnsupportedModelError


def _full_forward_kl(model, tokens, moe, members, freq):
    """Independent: the whole model forward with the merge applied, explicit float64 KL(orig || merged)."""
    with torch.no_grad():
        p = torch.log_softmax(model(tokens).logits.double(), -1)
        with merged(moe, members, freq):
            q = torch.log_softmax(model(tokens).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_barriers_match_full_forward_passes(family, tokens):
    model = moe_model(family)
    engine = BarrierEngine(model, tokens, BarrierConfig(merges_per_pass=3, batch_size=2, positions_per_chunk=7,
                                                       progress=False))
    assert [m.index for m in engine.moe_layers] == [0, 1]
    for layer in (0, 1):
        sets = [(0, 1), (2, 5), (1, 3, 4), (0, 2, 3, 5)]
        got = engine.barriers(layer, sets)
        moe = engine.by_index[layer]
        freq = engine.stats[layer].frequencies
        want = [_full_forward_kl(model, tokens, moe, s, freq) for s in sets]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want, dtype=torch.float64), rtol=5e-4, atol=1e-9)  # float32 KL
        assert all(v > 0 for v in got)


def test_self_barrier_is_zero_barriers_are_nonnegative_and_weights_restore_bit_exactly(tokens):
    model = moe_model("mixtral", dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(tokens).logits
    engine = BarrierEngine(model, tokens, BarrierConfig(progress=False))
    pairs, b = engine.pair_barriers(0)
    assert len(pairs) == 15 and (b >= 0).all()
    assert engine.barriers(0, [(3,), (3, 3)]).tolist() == [0.0, 0.0]
    # barriers() short-circuits singletons: run the engine's own merge path on expert 3 merged with itself
    moe, freq = engine.by_index[0], engine.stats[0].frequencies
    (self_merge,) = engine._evaluate(moe, [(3, 3)])
    assert self_merge == pytest.approx(_full_forward_kl(model, tokens, moe, (3, 3), freq), abs=1e-7)
    assert self_merge == pytest.approx(0.0, abs=1e-7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, logits)


def test_merge_operator_weights_by_frequency():
    w = torch.randn(4, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(merge_operator(w, [1, 3], [0.1, 0.5, 0.0, 0.5]), (w[1] + w[3]) / 2)
    torch.testing.assert_close(merge_operator(w, [0, 1], [0.2, 0.6, 0, 0]), 0.25 * w[0] + 0.75 * w[1])
    torch.testing.assert_close(merge_operator(w, [0, 2], [0.0, 0.6, 0.0, 0]), (w[0] + w[2]) / 2)  # zero mass: mean
    with pytest.raises(DataError):
        merge_operator(w, [], [1, 1, 1, 1])


def test_routing_frequencies_and_reap_match_a_direct_computation(tokens):
    model = moe_model("olmoe")
    engine = BarrierEngine(model, tokens, BarrierConfig(progress=False))
    moe = find_moe_layers(model)[0]
    with torch.no_grad():
        x = model.model.layers[0].post_attention_layernorm(
            model.model.layers[0].self_attn(
                hidden_states=model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens)),
                position_embeddings=model.model.rotary_emb(model.model.embed_tokens(tokens),
                                                           torch.arange(10)[None]),
                attention_mask=None,
            )[0] + model.model.embed_tokens(tokens)).reshape(-1, 16)
        # REAP from the definition: gate weight of routed tokens times expert output norm
        probs = torch.softmax(x @ moe.router.weight.T, -1)
        top_w, top_i = probs.topk(2, -1)
        counts = torch.zeros(6, dtype=torch.float64)
        reap = torch.zeros(6, dtype=torch.float64)
        for t in range(x.shape[0]):
            for s in range(2):
                j = int(top_i[t, s])
                gu = moe.experts.gate_up_proj[j] @ x[t]
                out = moe.experts.down_proj[j] @ (torch.nn.functional.silu(gu[:12]) * gu[12:])
                counts[j] += 1
                reap[j] += top_w[t, s] * out.norm()
    stats = engine.stats[0]
    torch.testing.assert_close(stats.frequencies.double(), counts / 30, rtol=0, atol=1e-7)
    torch.testing.assert_close(stats.reap.double(), torch.where(counts > 0, reap / counts.clamp_min(1), 0.0),
                               rtol=1e-5, atol=1e-7)


def test_resumable_cache_skips_done_work_and_refuses_foreign_caches(tokens, tmp_path):
    model = moe_model("qwen3_moe")
    path = tmp_path / "b.json"
    first = BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path)
    partial = first.barriers(0, [(0, 1), (0, 2)])
    again = BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path)
    _pairs, b = again.pair_barriers(0)
    assert again.evaluations == 15 - 2
    assert b[:2].tolist() == partial.tolist()
    other = BarrierEngine(model, tokens[:, :5], BarrierConfig(progress=False))
    with pytest.raises(CheckpointError):
        BarrierCache(path, other.cache.fingerprint)


def test_candidate_triangles_are_capped_seeded_cliques_of_low_barrier_pairs():
    pairs = list(itertools.combinations(range(8), 2))
    values = torch.rand(len(pairs), generator=torch.Generator().manual_seed(1)).tolist()
    ordered = sorted(values)
    median = (ordered[13] + ordered[14]) / 2  # 28 values
    low = {p for p, v in zip(pairs, values) if v <= median}
    brute = [t for t in itertools.combinations(range(8), 3) if set(itertools.combinations(t, 2)) <= low]
    assert len(brute) > 3
    assert candidate_triangles(pairs, values, cap=1000) == brute
    capped = candidate_triangles(pairs, values, cap=3, seed=5)
    assert len(capped) == 3 and set(capped) <= set(brute)
    assert capped == candidate_triangles(pairs, values, cap=3, seed=5)
    with pytest.raises(ShapeError, match="27 values for 28 edges"):
        candidate_triangles(pairs, values[:-1])


def test_bad_inputs_raise_klcore_errors(tokens):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError):
        find_moe_layers(dense)
    with pytest.raises(UnsupportedModelError):
        BarrierEngine(dense, tokens)
    v4_style = moe_model("mixtral")  # a transformers-4 style block: experts in a ModuleList
    v4_style.model.layers[0].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(6)])
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        find_moe_layers(v4_style)
    model = moe_model("mixtral")
    with pytest.raises(DataError):
        BarrierEngine(model, tokens + 100)
    with pytest.raises(ConfigError):
        BarrierConfig(kl_direction="sideways")
    engine = BarrierEngine(model, tokens, BarrierConfig(progress=False))
    with pytest.raises(ConfigError):
        engine.barriers(5, [(0, 1)])
    with pytest.raises(DataError):
        engine.barriers(0, [(0, 9)])


def test_cache_log_appends_one_line_per_batch_and_drops_a_truncated_last_line(tokens, tmp_path):
    model = moe_model("mixtral")
    path = tmp_path / "b.jsonl"
    cfg = BarrierConfig(progress=False, merges_per_pass=2)
    first = BarrierEngine(model, tokens, cfg, cache_path=path)
    appended = []
    original_add = first.cache.add

    def add(values):
        original_add(values)
        appended.append(path.read_text().splitlines()[-1])

    first.cache.add = add
    want = first.barriers(0, [(0, 1), (0, 2), (0, 3), (1, 2)])
    # the first batch creates the file; the second is appended as a line of its own
    assert [sorted(json.loads(line)["values"]) for line in appended] == [["0:0,1", "0:0,2"], ["0:0,3", "0:1,2"]]
    assert path.read_text().count("\n") == 1  # compacted at the end
    # an interrupted run: two batches logged, the third cut short mid-line
    header = json.dumps({"fingerprint": first.cache.fingerprint})
    lines = [header, json.dumps({"values": {"0:0,1": want[0], "0:0,2": want[1]}}),
             json.dumps({"values": {"0:0,3": want[2]}}), '{"values": {"0:1,2": 0.12']
    path.write_text("\n".join(lines))
    again = BarrierEngine(model, tokens, cfg, cache_path=path)
    assert set(again.cache.values) == {"0:0,1", "0:0,2", "0:0,3"}
    got = again.barriers(0, [(0, 1), (0, 2), (0, 3), (1, 2)])
    assert again.evaluations == 1
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-12)
    assert BarrierCache(path, first.cache.fingerprint).values.keys() == {"0:0,1", "0:0,2", "0:0,3", "0:1,2"}
    path.write_text("\n".join([header, "{not json", lines[1]]))  # corruption before the last line is an error
    with pytest.raises(CheckpointError, match="line 2"):
        BarrierCache(path, first.cache.fingerprint)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_changing_a_router_or_attention_weight_invalidates_the_cache(tokens, tmp_path, name):
    model = moe_model("mixtral")
    path = tmp_path / "b.jsonl"
    BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path).barriers(0, [(0, 1)])
    with torch.no_grad():
        model.get_parameter(name)[0, 0] += 0.25
    with pytest.raises(CheckpointError, match="another model"):
        BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path)


def test_engine_evaluates_in_eval_mode_and_restores_training_mode(tokens):
    model = moe_model("mixtral")
    sets = [(0, 1), (2, 4, 5)]
    want = BarrierEngine(model, tokens, BarrierConfig(progress=False)).barriers(1, sets)
    for layer in model.model.layers:  # dropout and router jitter act only in training mode
        layer.self_attn.attention_dropout = 0.5
        layer.mlp.jitter_noise = 0.5
    model.train()
    model.model.layers[0].mlp.eval()  # a mixed-mode model comes back exactly as it was
    engine = BarrierEngine(model, tokens, BarrierConfig(progress=False))
    got = engine.barriers(1, sets)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-12, atol=0)
    assert model.training and model.model.layers[1].mlp.training and not model.model.layers[0].mlp.training


def test_renumbered_experts_do_not_reuse_the_cache(tokens, tmp_path):
    model = moe_model("mixtral")
    path = tmp_path / "b.jsonl"
    BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path).barriers(0, [(0, 1)])
    perm = torch.tensor([1, 0, 2, 3, 4, 5])  # the same function with experts 0 and 1 swapped: sums unchanged
    moe = find_moe_layers(model)[0]
    with torch.no_grad():
        for p in [*moe.expert_parameters().values(), moe.router.weight]:
            p.copy_(p[perm].clone())
    with pytest.raises(CheckpointError, match="another model"):
        BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path)


def test_weight_fingerprint_sees_rows_swapped_in_a_tensor_larger_than_its_sample():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g)
    swapped = w[torch.tensor([1, 0, *range(2, 64)])]
    assert weight_fingerprint({"w": w}, samples=100) == weight_fingerprint({"w": w.clone()}, samples=100)
    assert weight_fingerprint({"w": w}, samples=100) != weight_fingerprint({"w": swapped}, samples=100)
    one_value = w.clone()
    one_value.view(-1)[0] += 1.0  # flat position 0 is always sampled; the sums move too
    assert weight_fingerprint({"w": w}, samples=100) != weight_fingerprint({"w": one_value}, samples=100)


def test_non_finite_barriers_are_not_cached_and_a_rerun_recomputes_them(tokens, tmp_path, monkeypatch):
    model = moe_model("mixtral")
    path = tmp_path / "b.jsonl"
    engine = BarrierEngine(model, tokens, BarrierConfig(progress=False, merges_per_pass=2), cache_path=path)
    honest = engine._evaluate
    monkeypatch.setattr(engine, "_evaluate", lambda moe, merges: [
        float("nan") if m == (0, 2) else v for m, v in zip(merges, honest(moe, merges))])
    with pytest.raises(NonFiniteError, match=r"merging experts \(0, 2\).*never cached"):
        engine.barriers(0, [(0, 1), (0, 2)])
    assert "nan" not in path.read_text().lower()
    again = BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path)
    b = again.barriers(0, [(0, 1), (0, 2)])
    assert again.evaluations == 1 and np.isfinite(b).all()
    # a cache written by an older version with a NaN in it: the value is dropped on load and recomputed
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, json.dumps({"values": {"0:0,2": float("nan")}})]) + "\n")
    third = BarrierEngine(model, tokens, BarrierConfig(progress=False), cache_path=path)
    assert "0:0,2" not in third.cache.values and third.barriers(0, [(0, 2)])[0] == pytest.approx(b[1], abs=1e-12)
