from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from klcore.errors import ConfigError
from klcore.plugins import build_plugin_manager
from klcore.recipes import run_recipe

TINY = [
    "num_experts=6", "hidden_size=16", "expert_size=16", "seq_len=16", "train_steps=3", "batch_size=4",
    "calibration_tokens=64", "eval_tokens=64", "hodgecover.num_thresholds=10", "hodgecover.triangle_cap=10",
    "hodgecover.barrier.progress=false", "hodgecover.relabelings=2", "seeds=[0,1]", "random_draws=2",
    "lambdas=[4]",
]


def test_hodge_toy_runs_at_a_tiny_size_through_klcore_experiments(tmp_path):
    plugins = build_plugin_manager()
    summary = run_recipe(plugins, "hodge-toy", out=tmp_path, overrides=TINY)
    variants = summary["experiment"]["variants"]
    assert set(variants) == {"diagnostics", "hodgecover", "no-triangle", "greedy-barrier", "reap", "frequency",
                             "random", "hc-smoe", "hodgecover-wanda", "reap-wanda", "frequency-wanda",
                             "hodgecover-lambda4"}
    assert summary["experiment"]["seeds"] == [0, 1]
    diag = variants["diagnostics"]
    for name in ("additive_r2", "triplet_over_pair_sum", "min_expert_share", "harmonic_share",
                 "relabel_distinct_sets", "ppl_uncompressed"):
        assert diag[name]["n"] == 2, name
    assert diag["relabel_distinct_sets"]["mean"] >= 1 and diag["ppl_uncompressed"]["mean"] > 1
    for v, stats in variants.items():
        if v != "diagnostics":
            assert {"ppl@0.33", "ppl@0.66"} <= stats.keys() and stats["ppl@0.33"]["half_width"] is not None
    rand = variants["random"]
    assert rand["ppl_min@0.66"]["mean"] <= rand["ppl@0.66"]["mean"] <= rand["ppl_max@0.66"]["mean"]
    for r in (0.33, 0.66):  # realised hybrid compression: expert share + Wanda up to the target
        assert variants["reap-wanda"][f"compression@{r:g}"]["mean"] == pytest.approx(r, abs=1 / 16)
    for name in ("summary.json", "report.md", "energy.png", "filtration.png", "perplexity.png",
                 "experiment/summary.json", "seeds/seed-0/barriers.jsonl", "seeds/seed-1/model.pt"):
        assert (tmp_path / name).exists(), name
    assert "Structure first" in (tmp_path / "report.md").read_text()
    # resumable: a second run loads every result and trains nothing
    again = run_recipe(plugins, "hodge-toy", out=tmp_path, overrides=TINY)
    assert again["experiment"]["variants"]["hodgecover"]["ppl@0.33"] == variants["hodgecover"]["ppl@0.33"]


def test_checkpoint_recipe_prunes_a_saved_model_that_reloads(tmp_path):
    from hodgecover.redirect_checkpoint import load_redirected
    from hodgecover.toy_recipe import HodgeToyConfig, build_model, toy_text

    from klcore.toy import char_tokenizer

    model = build_model(HodgeToyConfig(num_experts=6, hidden_size=16, expert_size=16, seq_len=16))
    model.save_pretrained(tmp_path / "ckpt")
    char_tokenizer().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "calib.txt").write_text(toy_text(200, seed=0, split="train"))
    out = tmp_path / "run"
    plugins = build_plugin_manager()
    overrides = [f"model={tmp_path / 'ckpt'}", "ratio=0.5", f"calibration={tmp_path / 'calib.txt'}",
                 f"evaluation={tmp_path / 'calib.txt'}", "num_tokens=64", "seq_len=16",
                 "hodgecover.num_thresholds=10", "hodgecover.barrier.progress=false"]
    summary = run_recipe(plugins, "hodgecover", out=out, overrides=overrides)
    assert all(len(k) == 3 for k in summary["plan"]["keep"].values())
    for spread in summary["relabeling"].values():
        assert spread["relabelings"] == 10 and spread["hodgecover/distinct_sets"] >= 1
        assert spread["harmonic_share_min"] <= spread["harmonic_share"] <= spread["harmonic_share_max"]
    assert "relabeling spread" in (out / "report.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert loaded.config.num_local_experts == 3
    with torch.no_grad():
        loaded(torch.randint(3, 40, (1, 8)))
    # resumable: a second run over the same folder reuses every barrier
    again = run_recipe(plugins, "hodgecover", out=out, overrides=[*overrides, "save=false"])
    assert again["barrier_evaluations"] == 0
    # a redirected model (HC-SMoE binds slots) is saved as a stock E-slot checkpoint + redirect.pt
    run_recipe(plugins, "hodgecover", out=out, overrides=[*overrides, "method=hc-smoe"])
    stock = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    compact = load_redirected(out / "model").eval()
    assert stock.config.num_local_experts == 6 and compact.model.layers[0].mlp.experts.num_experts == 3
    ids = torch.randint(3, 40, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, stock(ids).logits)


def test_recipe_configs_reject_bad_values():
    from hodgecover.checkpoint_recipe import CheckpointConfig
    from hodgecover.toy_recipe import HodgeToyConfig

    with pytest.raises(ConfigError):
        CheckpointConfig(ratio=1.0)
    with pytest.raises(ConfigError):
        HodgeToyConfig(ratios=[0.5, 0.0])
    with pytest.raises(ConfigError):
        HodgeToyConfig(methods=["nope"])
