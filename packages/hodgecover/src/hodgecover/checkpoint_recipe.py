"""Recipe ``hodgecover``: compress a Hugging Face MoE checkpoint folder (``--set model=PATH --set ratio=0.5``).

Barriers are cached in ``OUT/barriers.jsonl``: re-running with the same ``--out`` continues an interrupted run.
The compressed model (with its tokenizer) is saved to ``OUT/model`` and loads with ``from_pretrained``; a redirected
one (``dropped=redirect`` or ``hc-smoe``) is saved as a stock checkpoint with one slot per original expert holding
its survivor's weights, plus ``redirect.pt``, and ``load_redirected(OUT/model)`` gives back the compact model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hodgecover.calibration import perplexity, token_blocks
from hodgecover.pipeline import METHODS, HodgeCoverConfig, analyze, apply_plan, plan
from hodgecover.redirect_checkpoint import save_redirected
from hodgecover.relabeling import SPREAD_METHODS, relabeling_spread
from hodgecover.toy_recipe import toy_text
from hodgecover.wanda import hybrid_sparsity, wanda_prune
from klcore.errors import CheckpointError, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CheckpointConfig:
    """``model``: a local checkpoint folder or hub name; ``calibration``: a text file, a ``datasets`` dataset id
    (``name:subset:split``), by default the built-in toy text (a placeholder: pass real text); ``evaluation`` (optional) the same for held-out perplexity. ``ratio``: fraction of
    experts removed per layer. ``wanda_target`` > ``ratio`` adds Wanda on the survivors up to that total."""

    model: str = ""
    ratio: float = 0.5
    method: str = "hodgecover"
    calibration: str = ""
    evaluation: str = ""
    text_column: str = "text"
    num_tokens: int = 2048
    seq_len: int = 256
    wanda_target: float = 0.0
    dtype: str = "float32"
    device: str = "auto"
    save: bool = True
    hodgecover: HodgeCoverConfig = field(default_factory=HodgeCoverConfig)

    def __post_init__(self) -> None:
        if isinstance(self.hodgecover, dict):
            self.hodgecover = HodgeCoverConfig(**self.hodgecover)
        if not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(f"ratio must lie in (0, 1), got {self.ratio!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.wanda_target and not self.ratio <= self.wanda_target < 1.0:
            raise ConfigError(f"wanda_target must be 0 (off) or in [ratio, 1), got {self.wanda_target}")


def run(config: CheckpointConfig, run_dir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hodgecover.report import layer_table, markdown_table, plot_energy, plot_filtration  # matplotlib: lazy

    if not config.model:
        raise ConfigError("set the checkpoint: klcore run hodgecover --set model=PATH --set ratio=0.5 --out DIR")
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=DTYPES[config.dtype])
        model = model.to(device).eval()  # type: ignore[arg-type]
    except OSError as err:
        raise CheckpointError(f"could not load {config.model!r} ({err}); give a checkpoint folder with config, "
                              "weights and tokenizer") from err
    t0 = time.perf_counter()
    source: Any = config.calibration or [toy_text(config.num_tokens, seed=0, split="train")]
    calib = token_blocks(tokenizer, source, num_tokens=config.num_tokens, seq_len=config.seq_len,
                         text_column=config.text_column)
    engine, analyses = analyze(model, calib, config.hodgecover, cache_path=run_dir / "barriers.jsonl")
    chosen = plan(analyses, config.method, config.ratio, config.hodgecover)
    summary: dict[str, Any] = {"plan": chosen.summary(), "layers": layer_table(analyses),
                               "barrier_evaluations": engine.evaluations,
                               "calibration": config.calibration or "built-in toy text (pass --set calibration=FILE)"}
    spread_methods = tuple(m for m in (config.method,) if m in SPREAD_METHODS)
    if config.hodgecover.relabelings and spread_methods:
        summary["relabeling"] = {layer: relabeling_spread(a, config.hodgecover, config.ratio, methods=spread_methods)
                                 for layer, a in analyses.items()}
    held_out = None
    if config.evaluation:
        held_out = token_blocks(tokenizer, config.evaluation, num_tokens=config.num_tokens, seq_len=config.seq_len,
                                text_column=config.text_column)
        summary["eval/ppl_uncompressed"] = perplexity(model, held_out)
    apply_plan(model, chosen, analyses)
    if config.wanda_target:
        r2 = hybrid_sparsity(model, engine.stats, chosen.keep, config.wanda_target)  # from the realised 1 - K/E
        summary.update(wanda_prune(model, engine.stats, chosen.keep, r2), **{"wanda/ratio": r2})
    if held_out is not None:
        summary["eval/ppl_compressed"] = perplexity(model, held_out)
    summary["time_s"] = time.perf_counter() - t0
    if config.save:
        if chosen.redirect is None:
            model.save_pretrained(run_dir / "model")
        else:  # stock E-slot checkpoint (tied survivor weights) + redirect.pt for load_redirected
            save_redirected(model, run_dir / "model")
            summary["load_with"] = "hodgecover.load_redirected (compact) or from_pretrained (E slots, same logits)"
        tokenizer.save_pretrained(run_dir / "model")
        summary["saved_to"] = str(run_dir / "model")
    plot_energy(analyses, run_dir / "energy.png")
    plot_filtration(analyses, run_dir / "filtration.png")
    rows = [[r["layer"], r["edges"], r["triangles"], r["tau_star"], r["energy/gradient"], r["energy/curl"],
             r["energy/harmonic"]] for r in summary["layers"]]
    spread = summary.get("relabeling", {})
    spread_rows = [[layer, r["relabelings"], r["harmonic_share_min"], r["harmonic_share_max"],
                    r[f"{config.method}/distinct_sets"], r[f"{config.method}/min_jaccard"]] for layer, r in spread.items()]
    spread_md = ("\n\nrelabeling spread (experts renumbered at random, barriers reused):\n\n" + markdown_table(
        ["layer", "relabelings", "harm. share min", "harm. share max", "distinct survivor sets", "min Jaccard"],
        spread_rows)) if spread_rows else ""
    (run_dir / "report.md").write_text(
        f"# hodgecover on {config.model}\n\nmethod {config.method}, ratio {config.ratio}\n\n"
        + markdown_table(["layer", "edges", "triangles", "tau*", "E_grad", "E_curl", "E_harm"], rows) + spread_md
        + "\n\n```json\n" + json.dumps({k: v for k, v in summary.items() if k.startswith("eval/")}, indent=2)
        + "\n```\n\n![energy](energy.png) ![filtration](filtration.png)\n"
    )
    return summary


__all__ = ["CheckpointConfig", "run"]
