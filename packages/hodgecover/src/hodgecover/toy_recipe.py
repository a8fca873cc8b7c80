"""Recipe ``hodge-toy``: an experiment (``klcore.experiments``) comparing expert-reduction methods on a tiny MoE.

Per seed, a 16-expert Mixtral is trained on toy text with the load-balancing loss, its barriers are computed once,
and every method compresses it at every ratio with one dropped mechanism (``hodgecover.dropped``, ``redirect`` by
default; HC-SMoE binds its slots likewise). The ``diagnostics`` variant comes first: the structure the topology could
use (additive-fit R^2 of the pair barriers, triplet over pair-sum ratio), expert usage, the Hodge split and its
relabeling spread. ``random`` is a distribution over ``random_draws`` draws per seed; every ``+Wanda`` hybrid has a
like-for-like rival (``reap-wanda``, ``frequency-wanda``); ``hodgecover-lambda<x>`` sweep the coverage weights.

Toy text mixes four kinds of character strings (additions, multiplications, digit sorting, and sentences over
a small word list) so that experts specialise. Calibration and held-out evaluation use different seeds; held-out
arithmetic comes from a disjoint split of operand pairs.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hodgecover.barriers import BarrierConfig, BarrierEngine
from hodgecover.calibration import perplexity
from hodgecover.pipeline import METHODS, HodgeCoverConfig, LayerAnalysis, analyze, apply_plan, plan
from hodgecover.relabeling import relabeling_spread
from hodgecover.structure import additive_fit_r2, triplet_pair_ratio
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
    return HodgeCoverConfig(triangle_cap=200, dropped="redirect", barrier=BarrierConfig(merges_per_pass=8, batch_size=16))


HYBRID_RIVALS = ("hodgecover", "reap", "frequency")


@dataclass
class HodgeToyConfig:
    """Model, training, data and compression settings; ``hodgecover`` holds the method options.

    ``seeds``: model seeds (each trains, analyses and compresses its own model). ``random_draws``: random selections
    per seed. ``lambdas``: extra HodgeCover variants with ``lambda_edge = lambda_triangle = x`` beside the configured
    one. ``aux_loss_coef``: weight of Mixtral's load-balancing loss in training. ``hybrid``: the ``<m>-wanda``
    variants (``hybrid_expert_share`` of each ratio by experts, the rest by Wanda) for HodgeCover, REAP, frequency.
    """

    num_experts: int = 16
    top_k: int = 2
    hidden_size: int = 64
    expert_size: int = 128
    layers: int = 2
    seq_len: int = 64
    train_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    aux_loss_coef: float = 0.02
    calibration_tokens: int = 2048
    eval_tokens: int = 8192
    ratios: list[float] = field(default_factory=lambda: [0.33, 0.66])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    random_draws: int = 10
    lambdas: list[float] = field(default_factory=lambda: [0.25, 4.0])
    hybrid: bool = True
    hybrid_expert_share: float = 0.5
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
        if not self.seeds or self.random_draws < 1 or self.aux_loss_coef < 0 or any(x < 0 for x in self.lambdas):
            raise ConfigError("need at least one seed, random_draws >= 1, aux_loss_coef >= 0 and lambdas >= 0")


def build_model(config: HodgeToyConfig, seed: int = 0) -> torch.nn.Module:
    from klcore.toy import tiny_causal_lm, tiny_moe_config

    cfg = tiny_moe_config("small", num_experts=config.num_experts, top_k=config.top_k, max_positions=config.seq_len)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = config.hidden_size, config.expert_size, config.layers
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    cfg.router_aux_loss_coef = config.aux_loss_coef
    return tiny_causal_lm(cfg, seed=seed)


def train(model: torch.nn.Module, tokens: torch.Tensor, config: HodgeToyConfig, seed: int = 0) -> list[float]:
    """Next-token training plus ``aux_loss_coef`` x Mixtral's load-balancing loss, AdamW with a cosine schedule;
    the total loss per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(config.train_steps, 1))
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    steps = tqdm(range(config.train_steps), desc="train", disable=not config.hodgecover.barrier.progress)
    for _ in steps:
        batch = tokens[torch.randint(len(tokens), (config.batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch, output_router_logits=config.aux_loss_coef > 0).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@dataclass
class SeedContext:
    """One seed's trained model, its analysis and its held-out tokens, shared by every variant of that seed."""

    model: torch.nn.Module
    engine: BarrierEngine
    analyses: dict[int, LayerAnalysis]
    held_out: torch.Tensor
    diagnostics: dict[str, float]


def _prepare(config: HodgeToyConfig, seed: int, folder: Path) -> SeedContext:
    """Train (or reload) the seed's model, compute its barriers (cached in ``folder``) and its diagnostics."""
    from klcore.toy import char_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    train_tokens = toy_blocks(tok, max(config.train_steps * config.batch_size * config.seq_len // 4, 8192),
                              config.seq_len, seed=seed, split="train")
    calib = toy_blocks(tok, config.calibration_tokens, config.seq_len, seed=seed + 1000, split="train")
    held_out = toy_blocks(tok, config.eval_tokens, config.seq_len, seed=seed + 2000, split="test")
    model = build_model(config, seed)
    weights = folder / "model.pt"
    t0 = time.perf_counter()
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        loss_end = float("nan")
    else:
        losses = train(model, train_tokens, config, seed)
        loss_end = losses[-1] if losses else float("nan")
        torch.save(model.state_dict(), weights)
    train_s = time.perf_counter() - t0
    engine, analyses = analyze(model, calib, config.hodgecover, cache_path=folder / "barriers.jsonl")
    diagnostics = _diagnostics(config, analyses)
    diagnostics.update({"ppl_uncompressed": perplexity(model, held_out), "train_loss_end": loss_end,
                        "train_s": train_s, "barrier_evaluations": float(engine.evaluations)})
    return SeedContext(model, engine, analyses, held_out, diagnostics)


def _diagnostics(config: HodgeToyConfig, analyses: dict[int, LayerAnalysis]) -> dict[str, float]:
    """Means over layers: structure, expert usage, Hodge split, relabeling spread at the first ratio."""
    rows = []
    for a in analyses.values():
        share = a.stats.frequencies.double().numpy() / a.top_k  # share of routed slots per expert, sums to 1
        spread = relabeling_spread(a, config.hodgecover, config.ratios[0], methods=("hodgecover",))
        rows.append({
            "additive_r2": additive_fit_r2(a.num_experts, a.pairs, a.pair_barriers),
            "triplet_over_pair_sum": triplet_pair_ratio(a.pairs, a.pair_barriers, a.triangles, a.triangle_barriers),
            "min_expert_share": float(share.min()),
            "experts_below_0.5pct": float((share < 0.005).sum()),
            "harmonic_share": spread["harmonic_share"],
            "relabel_harmonic_range": spread["harmonic_share_max"] - spread["harmonic_share_min"],
            "relabel_distinct_sets": float(spread["hodgecover/distinct_sets"]),
            "tau_star_is_last": float(a.curve is not None and a.curve.best_index == len(a.curve.thresholds) - 1),
            "complex_edges": float(a.complex.num_edges),
        })
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def variants(config: HodgeToyConfig) -> dict[str, dict[str, Any]]:
    """The experiment's variants, fixed by the config before any result is seen."""
    out: dict[str, dict[str, Any]] = {"diagnostics": {}}
    for m in config.methods:
        out[m] = {"method": m}
    if config.hybrid:
        for m in HYBRID_RIVALS:
            out[f"{m}-wanda"] = {"method": m, "wanda": True}
    if "hodgecover" in config.methods:
        for lam in config.lambdas:
            out[f"hodgecover-lambda{lam:g}"] = {"method": "hodgecover", "lambda": lam}
    return out


def _compress(ctx: SeedContext, config: HodgeToyConfig, hc: HodgeCoverConfig, method: str, ratio: float,
              wanda: bool) -> dict[str, float]:
    expert_ratio = config.hybrid_expert_share * ratio if wanda else ratio
    chosen = plan(ctx.analyses, method, expert_ratio, hc)
    model = apply_plan(copy.deepcopy(ctx.model), chosen, ctx.analyses)
    out = {}
    if wanda:
        r2 = hybrid_sparsity(model, ctx.engine.stats, chosen.keep, ratio)  # from the realised 1 - K/E
        out[f"compression@{ratio:g}"] = wanda_prune(model, ctx.engine.stats, chosen.keep, r2)["wanda/compression"]
    out[f"ppl@{ratio:g}"] = perplexity(model, ctx.held_out)
    for c in ("harmonic", "triangle"):
        out[f"rho_{c}@{ratio:g}"] = float(np.mean([r.get(c, float("nan")) for r in chosen.retained.values()]))
    return out


def _evaluate(ctx: SeedContext, config: HodgeToyConfig, options: dict[str, Any], seed: int) -> dict[str, float]:
    method, wanda = options["method"], bool(options.get("wanda", False))
    hc = config.hodgecover
    if "lambda" in options:
        hc = replace(hc, lambda_edge=options["lambda"], lambda_triangle=options["lambda"])
    if method != "random":
        return {k: v for r in config.ratios for k, v in _compress(ctx, config, hc, method, r, wanda).items()}
    out: dict[str, float] = {}
    for r in config.ratios:  # a distribution over draws: its mean, and its range within this seed
        ppl = [_compress(ctx, config, replace(hc, seed=1000 * seed + d), "random", r, False)[f"ppl@{r:g}"]
               for d in range(config.random_draws)]
        out.update({f"ppl@{r:g}": float(np.mean(ppl)), f"ppl_min@{r:g}": float(np.min(ppl)),
                    f"ppl_max@{r:g}": float(np.max(ppl))})
    return out


def run(config: HodgeToyConfig, run_dir: Path) -> dict[str, Any]:
    """Every variant x seed through ``klcore.experiments.run_experiment`` (resumable), then the report."""
    from hodgecover.report import plot_energy, plot_filtration
    from klcore.experiments import run_experiment

    if config.threads:
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    contexts: dict[int, SeedContext] = {}

    def one(variant: str, options: dict[str, Any], seed: int, _folder: Path) -> dict[str, float]:
        if seed not in contexts:
            contexts[seed] = _prepare(config, seed, run_dir / "seeds" / f"seed-{seed}")
        ctx = contexts[seed]
        return ctx.diagnostics if variant == "diagnostics" else _evaluate(ctx, config, options, seed)

    result = run_experiment(one, variants(config), config.seeds, run_dir / "experiment",
                            title="hodge-toy", figure_metrics=[])
    if contexts:
        first = contexts[min(contexts)]
        plot_energy(first.analyses, run_dir / "energy.png")
        plot_filtration(first.analyses, run_dir / "filtration.png")
    _plot_ppl(result.summary, config, run_dir / "perplexity.png")
    (run_dir / "report.md").write_text(_report(result.summary, config, time.perf_counter() - t0))
    return {"experiment": result.summary, "options": {k: v for k, v in vars(config.hodgecover).items()
                                                      if k != "barrier"},
            "kl_direction": config.hodgecover.barrier.kl_direction, "time_s": time.perf_counter() - t0,
            "run_dir": str(run_dir)}


def _cell(stats: dict[str, Any] | None) -> str:
    if stats is None or stats["mean"] is None:
        return "-"
    hw = stats["half_width"]
    return f"{stats['mean']:.4g}" + (f" ± {hw:.2g}" if hw is not None else "")


def _report(summary: dict[str, Any], config: HodgeToyConfig, seconds: float) -> str:
    from hodgecover.report import markdown_table

    var = summary["variants"]
    diag = var["diagnostics"]
    diag_rows = [[k, _cell(v)] for k, v in diag.items()]
    methods = [v for v in var if v != "diagnostics"]
    cols = [f"{m}@{r:g}" for r in config.ratios for m in ("ppl", "rho_harmonic")]
    rows = [[v, *(_cell(var[v].get(c)) for c in cols)] for v in methods]
    rand = var.get("random", {})
    rand_rows = [[f"{r:g}", _cell(rand.get(f"ppl@{r:g}")), _cell(rand.get(f"ppl_min@{r:g}")),
                  _cell(rand.get(f"ppl_max@{r:g}"))] for r in config.ratios] if rand else []
    n = len(summary["seeds"])
    return f"""# hodge-toy

Seeds {summary["seeds"]} (n = {n}); each cell is the mean over seeds ± the half-width of its 95% Student t interval.
Tiny Mixtral: {config.layers} layers, {config.num_experts} experts (top-{config.top_k}), hidden {config.hidden_size},
expert width {config.expert_size}; {config.train_steps} training steps with load-balancing loss x {config.aux_loss_coef}.
Dropped experts: `{config.hodgecover.dropped}` for every method (HC-SMoE binds its member slots).

## Structure first (means over layers)

{markdown_table(["diagnostic", "value"], diag_rows)}

## Compression: held-out perplexity and retained harmonic mass

{markdown_table(["variant", *cols], rows)}

## Random: {config.random_draws} draws per seed (mean, smallest and largest draw)

{markdown_table(["ratio", "mean", "min", "max"], rand_rows)}

Wall time {seconds:.0f} s. Per-run metrics: `experiment/<variant>/seed-<n>/result.json`; `experiment/summary.json`.

![energy](energy.png) ![filtration](filtration.png) ![perplexity](perplexity.png)
"""


def _plot_ppl(summary: dict[str, Any], config: HodgeToyConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    var = {k: v for k, v in summary["variants"].items() if k != "diagnostics"}
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(var) + 2), 3.8))
    width = 0.8 / len(config.ratios)
    for n, r in enumerate(config.ratios):
        stats = [v.get(f"ppl@{r:g}") or {} for v in var.values()]
        means = [s.get("mean") or float("nan") for s in stats]
        err = [s.get("half_width") or 0.0 for s in stats]
        ax.bar([i + n * width for i in range(len(var))], means, width=width, yerr=err, capsize=2, label=f"ratio {r:g}")
    base = summary["variants"]["diagnostics"]["ppl_uncompressed"]["mean"]
    ax.axhline(base, color="k", ls="--", lw=1, label="uncompressed")
    ax.set_xticks([i + width * (len(config.ratios) - 1) / 2 for i in range(len(var))], list(var), rotation=35,
                  ha="right")
    ax.set_ylabel("held-out perplexity (mean, 95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["HYBRID_RIVALS", "HodgeToyConfig", "SeedContext", "build_model", "run", "toy_blocks", "toy_text", "train",
           "variants"]
