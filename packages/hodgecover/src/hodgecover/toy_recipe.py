"""Recipe ``hodge-toy``: train a tiny 16-expert Mixtral on toy text, compress it by every method, report.

Toy text mixes four kinds of character strings (additions, multiplications, digit sorting, and sentences over
a small word list) so that experts specialise. Calibration and held-out evaluation use different seeds; held-out
arithmetic comes from a disjoint split of operand pairs.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hodgecover.barriers import BarrierConfig
from hodgecover.calibration import perplexity
from hodgecover.pipeline import METHODS, HodgeCoverConfig, analyze, apply_plan, plan
from hodgecover.wanda import hybrid_sparsity, wanda_prune
from klcore.errors import ConfigError

WORDS = ("the", "a", "cat", "dog", "bird", "sat", "ran", "saw", "on", "under", "big", "small", "red", "blue",
         "mat", "tree", "and", "with", "quickly", "slowly")


def toy_text(num_items: int, *, seed: int, split: str) -> str:
    """``num_items`` space-separated items of four kinds: ``a+b=c.``, ``a*b=c.``, ``sort:digits>sorted.`` and
    sentences over a small word list. Arithmetic pairs with ``(7a + b) % 10 == 0`` form the ``test`` split."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    items: list[str] = []
    while len(items) < num_items:
        kind = rng.randrange(4)
        if kind < 2:
            a, b = (rng.randrange(1000), rng.randrange(1000)) if kind == 0 else (rng.randrange(100), rng.randrange(100))
            if ((7 * a + b) % 10 == 0) != (split == "test"):
                continue
            items.append(f"{a}+{b}={a + b}." if kind == 0 else f"{a}*{b}={a * b}.")
        elif kind == 2:
            digits = [rng.randrange(10) for _ in range(6)]
            items.append("sort:" + "".join(map(str, digits)) + ">" + "".join(map(str, sorted(digits))) + ".")
        else:
            items.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) + ".")
    return " ".join(items)


def toy_blocks(tokenizer: Any, num_tokens: int, seq_len: int, *, seed: int, split: str) -> torch.Tensor:
    ids = tokenizer(toy_text(num_tokens // 4 + 16, seed=seed, split=split), add_special_tokens=False)["input_ids"]
    blocks = num_tokens // seq_len
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


def _default_method_config() -> HodgeCoverConfig:
    return HodgeCoverConfig(triangle_cap=200, barrier=BarrierConfig(merges_per_pass=8, batch_size=16))


@dataclass
class HodgeToyConfig:
    """Model, training, data and compression settings; ``hodgecover`` holds the method options."""

    num_experts: int = 16
    top_k: int = 2
    hidden_size: int = 64
    expert_size: int = 128
    layers: int = 2
    seq_len: int = 64
    train_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    calibration_tokens: int = 2048
    eval_tokens: int = 8192
    ratios: list[float] = field(default_factory=lambda: [0.33, 0.66])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    hybrid: bool = True
    hybrid_expert_share: float = 0.5
    seed: int = 0
    threads: int = 0
    hodgecover: HodgeCoverConfig = field(default_factory=_default_method_config)

    def __post_init__(self) -> None:
        if isinstance(self.hodgecover, dict):
            self.hodgecover = HodgeCoverConfig(**self.hodgecover)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {METHODS}")
        if not all(0.0 < r < 1.0 for r in self.ratios) or not self.ratios:
            raise ConfigError(f"ratios must lie in (0, 1), got {self.ratios}")
        if self.num_experts < 3 or not 1 <= self.top_k < self.num_experts:
            raise ConfigError(f"need num_experts >= 3 and 1 <= top_k < num_experts, got {self.num_experts}, {self.top_k}")
        if min(self.train_steps, self.threads) < 0 or min(self.batch_size, self.layers, self.hidden_size) < 1:
            raise ConfigError("need train_steps, threads >= 0 and batch_size, layers, hidden_size >= 1")
        if self.seq_len < 2 or self.calibration_tokens < self.seq_len or self.eval_tokens < self.seq_len:
            raise ConfigError("need seq_len >= 2 and calibration_tokens, eval_tokens >= seq_len")
        if not 0.0 < self.hybrid_expert_share < 1.0:
            raise ConfigError(f"hybrid_expert_share must lie in (0, 1), got {self.hybrid_expert_share}")


def build_model(config: HodgeToyConfig) -> torch.nn.Module:
    from klcore.toy import tiny_causal_lm, tiny_moe_config

    cfg = tiny_moe_config("small", num_experts=config.num_experts, top_k=config.top_k, max_positions=config.seq_len)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = config.hidden_size, config.expert_size, config.layers
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    return tiny_causal_lm(cfg, seed=config.seed)


def train(model: torch.nn.Module, tokens: torch.Tensor, config: HodgeToyConfig) -> list[float]:
    """Plain next-token training with AdamW and a cosine schedule; losses per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(config.train_steps, 1))
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    model.train()
    steps = tqdm(range(config.train_steps), desc="train", disable=not config.hodgecover.barrier.progress)
    for _ in steps:
        batch = tokens[torch.randint(len(tokens), (config.batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def run(config: HodgeToyConfig, run_dir: Path) -> dict[str, Any]:
    """Train, analyse (barriers, complex, Hodge parts), compress by every method at every ratio, report."""
    from hodgecover.report import layer_table, plot_energy, plot_filtration, plot_perplexity  # matplotlib: lazy
    from klcore.toy import char_tokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    timings: dict[str, float] = {}
    t0, cpu0 = time.perf_counter(), time.process_time()
    tok = char_tokenizer()
    train_tokens = toy_blocks(tok, max(config.train_steps * config.batch_size * config.seq_len // 4, 8192),
                              config.seq_len, seed=config.seed, split="train")
    calib = toy_blocks(tok, config.calibration_tokens, config.seq_len, seed=config.seed + 1, split="train")
    held_out = toy_blocks(tok, config.eval_tokens, config.seq_len, seed=config.seed + 2, split="test")
    model = build_model(config)
    losses = train(model, train_tokens, config)
    timings["train_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    engine, analyses = analyze(model, calib, config.hodgecover, cache_path=run_dir / "barriers.jsonl")
    timings["analysis_s"] = time.perf_counter() - t1
    base_ppl = perplexity(model, held_out)

    t2 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for ratio in config.ratios:
        for method in config.methods:
            chosen = plan(analyses, method, ratio, config.hodgecover)
            compressed = apply_plan(copy.deepcopy(model), chosen, analyses)
            results.append({"method": method, "ratio": ratio, "ppl": perplexity(compressed, held_out),
                            "retained": _mean_retained(chosen.retained)})
        if config.hybrid:
            chosen = plan(analyses, "hodgecover", config.hybrid_expert_share * ratio, config.hodgecover)
            compressed = apply_plan(copy.deepcopy(model), chosen, analyses)
            r2 = hybrid_sparsity(compressed, engine.stats, chosen.keep, ratio)  # from the realised 1 - K/E
            pruned = wanda_prune(compressed, engine.stats, chosen.keep, r2)
            r1 = 1 - sum(len(chosen.keep[k]) for k in analyses) / sum(a.num_experts for a in analyses.values())
            results.append({"method": "hodgecover+wanda", "ratio": ratio, "ppl": perplexity(compressed, held_out),
                            "retained": _mean_retained(chosen.retained), "expert_ratio": r1, "wanda_ratio": r2,
                            "compression": pruned["wanda/compression"]})
    timings["compress_eval_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    timings["total_cpu_s"] = time.process_time() - cpu0  # CPU time of this process (the machine may be shared)

    plot_energy(analyses, run_dir / "energy.png")
    plot_filtration(analyses, run_dir / "filtration.png")
    plot_perplexity(results, base_ppl, run_dir / "perplexity.png")
    layers = layer_table(analyses)
    _write_report(run_dir, config, layers, results, base_ppl, losses, timings, engine.evaluations)
    return {
        "train/loss_start": losses[0] if losses else None,
        "train/loss_end": losses[-1] if losses else None,
        "eval/ppl_uncompressed": base_ppl,
        "results": results,
        "layers": layers,
        "barrier_evaluations": engine.evaluations,
        "options": {k: v for k, v in vars(config.hodgecover).items() if k != "barrier"},
        "kl_direction": config.hodgecover.barrier.kl_direction,
        "timings": timings,
        "run_dir": str(run_dir),
    }


def _mean_retained(retained: dict[int, dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in retained.values() for k in r})
    return {k: sum(r.get(k, 0.0) for r in retained.values()) / len(retained) for k in keys}


def _write_report(run_dir: Path, config: HodgeToyConfig, layers: list[dict[str, Any]], results: list[dict[str, Any]],
                  base_ppl: float, losses: list[float], timings: dict[str, float], evaluations: int) -> None:
    from hodgecover.report import markdown_table

    comps = ["gradient", "curl", "harmonic", "triangle"]
    rows = [[r["method"], r["ratio"], r["ppl"], *[r["retained"].get(c, float("nan")) for c in comps]] for r in results]
    layer_rows = [[row["layer"], row["edges"], row["triangles"], row["candidate_triangles"], row["tau_star"],
                   row["betti"], row["energy/gradient"], row["energy/curl"], row["energy/harmonic"], row["residual"]]
                  for row in layers]
    text = f"""# hodge-toy

Tiny Mixtral: {config.layers} layers, {config.num_experts} experts (top-{config.top_k}), hidden {config.hidden_size},
expert width {config.expert_size}; trained {config.train_steps} steps on toy text (loss {losses[0] if losses else 0:.3f}
-> {losses[-1] if losses else 0:.3f}). Calibration {config.calibration_tokens} tokens, held-out {config.eval_tokens}
tokens. Uncompressed held-out perplexity: **{base_ppl:.4f}**. Barrier evaluations: {evaluations}.

## Compression (held-out perplexity; mean over layers of the retained Hodge mass)

{markdown_table(["method", "ratio", "ppl", *[f"rho_{c}" for c in comps]], rows)}

## Complex per layer (at tau*)

{markdown_table(["layer", "edges", "triangles", "candidates", "tau*", "betti", "E_grad", "E_curl", "E_harm",
                 "residual"], layer_rows)}

Timings (s): {", ".join(f"{k} {v:.1f}" for k, v in timings.items())}.

![energy](energy.png) ![filtration](filtration.png) ![perplexity](perplexity.png)
"""
    (run_dir / "report.md").write_text(text)


__all__ = ["HodgeToyConfig", "build_model", "run", "toy_blocks", "toy_text", "train"]
