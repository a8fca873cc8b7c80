from __future__ import annotations

import copy
import itertools
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hodgecover.barriers import BarrierConfig, LayerStats
from hodgecover.calibration import perplexity, token_blocks
from hodgecover.complex import SimplicialComplex, decompose
from hodgecover.moe import find_moe_layers
from hodgecover.pipeline import METHODS, HodgeCoverConfig, analyze, analyze_layer, apply_plan, plan
from hodgecover.wanda import second_ratio, wanda_mask, wanda_prune
from hodgecover_models import moe_model

from klcore.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def analysed():
    model = moe_model("qwen2_moe", experts=8, dtype=torch.float32)
    tokens = torch.randint(3, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    config = HodgeCoverConfig(num_thresholds=20, barrier=BarrierConfig(progress=False))
    engine, analyses = analyze(model, tokens, config)
    return model, tokens, config, engine, analyses


def test_analysis_decomposes_the_barriers_of_the_chosen_complex(analysed):
    _model, _tokens, _config, _engine, analyses = analysed
    for _layer, a in analyses.items():
        assert len(a.pairs) == 28 and a.curve is not None
        assert a.curve.beta1[a.curve.best_index] == a.curve.beta1.max() == a.complex.betti_numbers()[1]
        lookup = dict(zip(a.pairs, a.pair_barriers))
        signal = np.array([lookup[e] for e in a.complex.edges]) * a.signs  # oriented by routing frequency
        assert set(a.signs.tolist()) <= {-1.0, 1.0}
        np.testing.assert_allclose(a.parts.gradient + a.parts.curl + a.parts.harmonic, signal, atol=1e-12)
        assert all(lookup[e] <= a.curve.best_threshold for e in a.complex.edges)
        assert len(a.triangles) == 56  # stratified candidates: all C(8, 3) triangles fit under the cap


@pytest.mark.parametrize("method", METHODS)
def test_every_method_compresses_to_the_budget_and_runs(analysed, method):
    model, tokens, config, _engine, analyses = analysed
    chosen = plan(analyses, method, 0.5, config)
    assert all(len(k) == 4 for k in chosen.keep.values())
    compressed = apply_plan(copy.deepcopy(model), chosen, analyses)
    assert all(m.num_experts == 4 for m in find_moe_layers(compressed))
    assert math.isfinite(perplexity(compressed, tokens))
    for r in chosen.retained.values():
        assert all(0.0 <= v <= 1.0 for v in r.values())


def test_redirect_keeps_router_rows_and_maps_dropped_experts(analysed):
    model, tokens, config, _engine, analyses = analysed
    cfg = copy.deepcopy(config)
    cfg.dropped = "redirect"
    chosen = plan(analyses, "hodgecover", 0.5, cfg)
    compressed = apply_plan(copy.deepcopy(model), chosen, analyses)
    for m in find_moe_layers(compressed):
        assert m.router.weight.shape[0] == 8 and m.num_experts == 4
    assert math.isfinite(perplexity(compressed, tokens))


def test_ratios_outside_the_open_interval_raise(analysed):
    _model, _tokens, config, _engine, analyses = analysed
    for bad in (0.0, 1.0, 1.2):
        with pytest.raises(ConfigError):
            plan(analyses, "hodgecover", bad, config)
    with pytest.raises(ConfigError):
        plan(analyses, "magic", 0.5, config)
    with pytest.raises(ConfigError):
        HodgeCoverConfig(filtration="sideways")


def test_wanda_mask_prunes_lowest_scores_per_output_row():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    sq = torch.tensor([1.0, 1.0, 0.01, 16.0])  # norms 1, 1, 0.1, 4 -> scores row0: 1, 2, .3, 2; row1: 4, 1, .1, 8
    mask = wanda_mask(w, sq, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert second_ratio(0.66, 0.33) == pytest.approx(1 - 0.34 / 0.67)
    assert 1 - (1 - 0.33) * (1 - second_ratio(0.66, 0.33)) == pytest.approx(0.66)
    with pytest.raises(ConfigError):
        second_ratio(0.2, 0.5)


def test_wanda_prune_reaches_the_requested_sparsity(analysed):
    model, _tokens, config, engine, analyses = analysed
    chosen = plan(analyses, "hodgecover", 0.5, config)
    compressed = apply_plan(copy.deepcopy(model), chosen, analyses)
    info = wanda_prune(compressed, engine.stats, chosen.keep, 0.5)
    assert info["wanda/sparsity"] == pytest.approx(0.5)
    m = find_moe_layers(compressed)[0]
    assert (m.experts.down_proj == 0).float().mean().item() == pytest.approx(0.5)
    shared = compressed.model.layers[0].mlp.shared_expert.up_proj.weight
    assert (shared == 0).float().mean().item() == pytest.approx(0.5)


def test_token_blocks_from_text_file_and_strings(tmp_path):
    from klcore.toy import char_tokenizer

    tok = char_tokenizer()
    path = tmp_path / "calib.txt"
    path.write_text("the cat sat on the mat. " * 20)
    blocks = token_blocks(tok, path, num_tokens=64, seq_len=16)
    assert blocks.shape == (4, 16)
    assert tok.decode(blocks[0].tolist()) == ("the cat sat on the mat. " * 2)[:16]
    assert token_blocks(tok, ["ab" * 20, "cd" * 20], num_tokens=32, seq_len=8).shape == (4, 8)
    with pytest.raises(DataError):
        token_blocks(tok, path, num_tokens=100000, seq_len=16)
    with pytest.raises(DataError):
        token_blocks(tok, tmp_path / "missing.txt", num_tokens=64, seq_len=16)


def test_token_blocks_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    from klcore.toy import char_tokenizer

    ds = datasets.Dataset.from_dict({"text": ["abc " * 10, "xyz " * 10]})
    assert token_blocks(char_tokenizer(), ds, num_tokens=40, seq_len=10).shape == (4, 10)


def test_perplexity_matches_a_manual_computation():
    model = moe_model("mixtral")
    tokens = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits[:, :-1], -1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).mean()
    assert perplexity(model, tokens, batch_size=1) == pytest.approx(float(nll.exp()), rel=1e-5)


def test_pyg_export_carries_the_complex_and_its_parts():
    pytest.importorskip("torch_geometric")
    from hodgecover.export import to_pyg

    cx = SimplicialComplex(4, [(0, 1), (1, 2), (0, 2), (2, 3)], [(0, 1, 2)])
    parts = decompose(cx, [1.0, 2.0, 3.0, 4.0])
    data = to_pyg(cx, parts, [1.0, 2.0, 3.0, 4.0])
    assert data.edge_index.tolist() == [[0, 0, 1, 2], [1, 2, 2, 3]]
    assert data.triangle_index.tolist() == [[0], [1], [2]]
    torch.testing.assert_close(data.gradient + data.curl + data.harmonic, data.edge_signal)


@pytest.mark.parametrize(("family", "target"), [("mixtral", 2 / 3), ("qwen2_moe", 0.6)])
def test_hybrid_reaches_its_target_over_the_counted_parameters(family, target):
    """Ratio 0.25 of 6 experts rounds to 2 dropped (realised r1 = 1/3, not 0.25); Wanda must complete the target
    over the original routed experts plus the shared expert's linears, which it prunes too."""
    from hodgecover.barriers import BarrierEngine
    from hodgecover.selection import experts_to_keep
    from hodgecover.surgery import prune_experts
    from hodgecover.wanda import hybrid_sparsity

    model = moe_model(family, experts=6, dtype=torch.float32)
    tokens = torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    engine = BarrierEngine(model, tokens, BarrierConfig(progress=False))
    assert experts_to_keep(6, 0.25, top_k=2) == 4
    keep = {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}
    counted = 0
    for m in find_moe_layers(model):  # independent count of the budget on the original model
        counted += m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()
        shared = getattr(m.block, "shared_expert", None)
        counted += sum(p.numel() for p in shared.parameters()) if shared is not None else 0
    prune_experts(model, keep)
    r2 = hybrid_sparsity(model, engine.stats, keep, target)
    info = wanda_prune(model, engine.stats, keep, r2)
    zeros = 0
    for m in find_moe_layers(model):
        zeros += int((m.experts.gate_up_proj == 0).sum() + (m.experts.down_proj == 0).sum())
        shared = getattr(m.block, "shared_expert", None)
        zeros += sum(int((p == 0).sum()) for p in shared.parameters()) if shared is not None else 0
    kept_params = counted - 2 * 2 * (model.model.layers[0].mlp.experts.gate_up_proj[0].numel()
                                     + model.model.layers[0].mlp.experts.down_proj[0].numel())
    realised = (counted - kept_params + zeros) / counted
    rows = sum(p.shape[-2] * (1 if p.dim() == 2 else p.shape[0]) for m in find_moe_layers(model)
               for p in [m.experts.gate_up_proj, m.experts.down_proj])
    tolerance = 1e-9 if family == "mixtral" else (rows + 2 * 3 * 16) / counted  # Wanda floors per output row
    assert realised == pytest.approx(target, abs=tolerance)
    assert info["wanda/compression"] == pytest.approx(realised, rel=1e-12)
    assert realised <= target + 1e-9
    with pytest.raises(ConfigError):
        hybrid_sparsity(model, engine.stats, keep, 0.2)  # stage 1 already removed 1/3


def test_triangle_filtration_without_candidate_triangles_falls_back_to_the_complete_graph():
    model = moe_model("mixtral", experts=4, dtype=torch.float32)
    tokens = torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    config = HodgeCoverConfig(filtration="triangles", triangle_cap=0, num_thresholds=5,
                              barrier=BarrierConfig(progress=False))
    _engine, analyses = analyze(model, tokens, config)
    for a in analyses.values():
        assert a.triangles == [] and a.curve is None
        assert a.complex.edges == a.pairs and a.complex.num_triangles == 0
        lookup = dict(zip(a.pairs, a.pair_barriers))
        np.testing.assert_allclose(a.parts.gradient + a.parts.harmonic, np.array([lookup[e] for e in a.pairs]) * a.signs,
                                   atol=1e-12)
    assert plan(analyses, "hodgecover", 0.5, config).keep.keys() == analyses.keys()


def test_pyg_export_without_torch_geometric_names_the_extra(monkeypatch):
    import sys

    from hodgecover.export import MissingExtraError, to_pyg

    from klcore.errors import KlcoreError

    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    monkeypatch.setitem(sys.modules, "torch_geometric.data", None)
    with pytest.raises(MissingExtraError, match=r"hodgecover\[pyg\]") as err:
        to_pyg(SimplicialComplex(2, [(0, 1)]))
    assert isinstance(err.value, ImportError) and isinstance(err.value, KlcoreError)


class _FakeEngine:
    """Stands in for a BarrierEngine with given pair barriers; a triangle's barrier is its largest edge + 0.01."""

    def __init__(self, n, values):
        self.pairs = list(itertools.combinations(range(n), 2))
        self.values = dict(zip(self.pairs, values))
        moe = SimpleNamespace(num_experts=n, top_k=2)
        self.by_index = {0: moe}
        self.stats = {0: LayerStats(frequencies=torch.ones(n) / n, reap=torch.ones(n), input_sq=torch.zeros(n, 1),
                                    hidden_sq=torch.zeros(n, 1), mean_output=torch.zeros(n, 1))}

    def pair_barriers(self, layer):
        return self.pairs, np.array([self.values[p] for p in self.pairs])

    def triplet_barriers(self, layer, tris):
        return np.array([max(self.values[(i, j)], self.values[(i, k)], self.values[(j, k)]) + 0.01
                         for i, j, k in tris])


def test_stratified_candidates_let_the_filtration_filter_and_the_median_rule_warns():
    n = 12
    engine = _FakeEngine(n, np.random.default_rng(3).exponential(size=math.comb(n, 2)))
    base = dict(num_thresholds=30, triangle_cap=150, barrier=BarrierConfig(progress=False))
    with pytest.warns(UserWarning, match="tau\\* is the last threshold"):
        median = analyze_layer(engine, 0, HodgeCoverConfig(triangle_sampling="median", **base))
    assert median.curve.best_index == len(median.curve.thresholds) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strat = analyze_layer(engine, 0, HodgeCoverConfig(**base))
    assert len(strat.triangles) == 150
    assert 0 < strat.curve.best_index < len(strat.curve.thresholds) - 1
    assert strat.complex.num_edges < math.comb(n, 2)  # K_tau* is a proper subcomplex
    levels = [max(engine.values[(i, j)], engine.values[(i, k)], engine.values[(j, k)]) for i, j, k in strat.triangles]
    top = max(engine.values.values())
    assert min(levels) < 0.25 * top and max(levels) > 0.75 * top  # candidates at low and high levels alike
