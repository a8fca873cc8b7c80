"""Recipe ``regionroute-toy``: two style experts on a tiny Flux, trained with and without the attention losses.

An experiment on ``klcore.experiments``: for each seed (``seeds``, 3 by default)

1. write a synthetic dataset (coloured shapes; a style is a texture or colour change inside the mask),
2. pre-train the tiny Flux transformer as an identity editor (target = source), then freeze it,
3. train two LoRA experts (per-sample hard routing) as two variants: ``lambda = 0`` and the RegionRoute
   defaults, from the same base, data and seed,
4. evaluate on the held-out examples: attention-mask IoU (full-mode attention of the style token, mean
   over layers, top-|M| pixels vs the mask), background MSE of sampled edits against the source, object
   MSE against the styled target.

``RUN/experiment/`` holds klcore's per-seed runs, ``summary.json`` (means, 95% t intervals) and curves;
``RUN/report.md`` the table with intervals, the paired per-seed differences and the panels of seed
``seeds[0]``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from klcore.errors import ConfigError
from klcore.trainer import TrainerConfig
from regionroute.capture import AttentionStore, register_attention_capture, remove_attention_capture
from regionroute.data import build_tensors, load_records
from regionroute.inference import sample_edit
from regionroute.losses import masks_on_grid
from regionroute.metrics import background_mse
from regionroute.moe import LoraMoE, add_style_experts, save_expert, style_lora_config
from regionroute.toy import STYLES, ToyTextEncoder, WordTokenizer, make_toy_dataset, tiny_flux
from regionroute.train import RegionRouteConfig, RegionRouteTrainer, cache_flux_inputs, flux_velocity, unpack_images


def _default_train() -> RegionRouteConfig:
    return RegionRouteConfig(trainer=TrainerConfig(steps=200, lr=2e-3, seed=0), batch_size=8, sample_every=100)


@dataclass
class ToyConfig:
    """Sizes of the toy world and model; ``train`` is the expert training config (``--set train.trainer.steps=5``).

    ``threads = 1`` by default: these matrices are too small to gain from a second thread, and OpenMP
    threads spinning on a shared CPU cost ~30x (measured); 0 keeps torch's default."""

    image_size: int = 16
    train_examples: int = 96
    eval_examples: int = 64
    styles: list[str] = field(default_factory=lambda: ["stripes", "invert"])
    heads: int = 4
    head_dim: int = 16
    dual_blocks: int = 2
    single_blocks: int = 2
    base_steps: int = 400
    base_lr: float = 2e-3
    base_batch: int = 16
    rank: int = 4
    sample_steps: int = 8
    threads: int = 1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: RegionRouteConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        if self.image_size % 2 or self.image_size < 8:
            raise ConfigError(f"image_size must be even and >= 8, got {self.image_size}")
        if len(self.styles) < 1 or any(s not in STYLES for s in self.styles):
            raise ConfigError(f"styles must be a non-empty subset of {STYLES}, got {self.styles}")
        if min(self.train_examples, self.eval_examples, self.base_batch, self.rank, self.sample_steps) < 1:
            raise ConfigError("train_examples, eval_examples, base_batch, rank and sample_steps must be >= 1")
        if self.base_steps < 0 or self.threads < 0:
            raise ConfigError("base_steps and threads must be >= 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and non-empty, got {self.seeds}")


def _world(config: ToyConfig, run_dir: Path, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tok = WordTokenizer()
    encoder = ToyTextEncoder(len(tok), 32, seed=seed)

    def encode_text(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [tok.encode(p) for p in prompts]
        width = max(map(len, ids))
        return encoder(torch.tensor([i + [tok.pad_id] * (width - len(i)) for i in ids]))

    n = config.train_examples + config.eval_examples
    records = load_records(make_toy_dataset(run_dir / "data", n=n, size=config.image_size, styles=config.styles, seed=seed))
    cache = cache_flux_inputs(build_tensors(records, tok.encode, config.styles), encode_text)
    train = {k: v[: config.train_examples] for k, v in cache.items()}
    held = {k: v[config.train_examples :] for k, v in cache.items()}
    return train, held


def _pretrain_base(config: ToyConfig, cache: dict[str, torch.Tensor], seed: int) -> torch.nn.Module:
    """Full training of the tiny transformer as an identity editor (flow matching, target = source)."""
    size = (config.image_size, config.image_size)
    model = tiny_flux(heads=config.heads, head_dim=config.head_dim, dual=config.dual_blocks, single=config.single_blocks, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.base_lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(config.base_steps):
        idx = torch.randint(cache["context"].shape[0], (config.base_batch,), generator=g)
        x0, ctx = cache["context"][idx], cache["context"][idx]
        t = torch.rand(len(idx), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        loss = F.mse_loss(flux_velocity(model, xt, ctx, cache["text"][idx], cache["pooled"][idx], t, size), noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


@torch.no_grad()
def _evaluate(model: torch.nn.Module, moe: LoraMoE, held: dict[str, torch.Tensor], config: ToyConfig) -> dict[str, Any]:
    size = (config.image_size, config.image_size)
    grid = (config.image_size // 2, config.image_size // 2)
    n = held["latents"].shape[0]
    moe.route(held["experts"])
    store = AttentionStore("full", chunk_size=256, target_tokens=held["latents"].shape[1], detach=True)
    register_attention_capture(model, store)
    store.set_tokens(held["token_indices"], held["token_indices"] >= 0)
    g = torch.Generator().manual_seed(1234)
    x0 = held["latents"]
    xt = 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=g)
    flux_velocity(model, xt, held["context"], held["text"], held["pooled"], torch.full((n,), 0.5), size)
    maps = store.stacked().mean(0)  # [n, N, S]
    valid = (held["token_objects"] == 0).float()  # the style tokens of the (single) object
    attn = (maps * valid[:, None, :]).sum(-1) / valid.sum(-1, keepdim=True)  # [n, N]
    store.clear_tokens()
    remove_attention_capture(model)
    mask_grid = masks_on_grid(held["masks"][:, :1], grid)[:, 0]  # [n, N]
    ious = []
    for a, m in zip(attn, mask_grid, strict=True):
        k = int(m.sum())
        top = torch.zeros_like(m)
        top[a.topk(k).indices] = 1
        ious.append(float((top * m).sum() / ((top + m) > 0).sum()))
    moe.route(held["experts"])
    tokens = sample_edit(model, held["context"], held["text"], held["pooled"], size, steps=config.sample_steps, generator=g)
    edits = unpack_images(tokens, *size)
    sources, targets = unpack_images(held["context"], *size), unpack_images(held["latents"], *size)
    mask = held["masks"][:, :1]
    moe.release()
    return {
        "iou": sum(ious) / len(ious),
        "bg_mse": float(background_mse(edits, sources, mask).mean()),
        "object_mse": float(background_mse(edits, targets, 1 - mask).mean()),
        "maps": attn.unflatten(1, grid), "masks": mask_grid.unflatten(1, grid),
        "edits": edits, "sources": sources, "targets": targets,
    }


def _sample_images(held: dict[str, torch.Tensor], config: ToyConfig) -> Any:
    """``on_sample`` callback: edits of four held-out sources, saved as ``RUN/samples/step-N.png``."""

    def on_sample(trainer: RegionRouteTrainer, step: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        size = (config.image_size, config.image_size)
        part = {k: v[:4] for k, v in held.items()}
        trainer.moe.route(part["experts"])
        tokens = sample_edit(trainer.unwrapped_model, part["context"], part["text"], part["pooled"], size,
                             steps=config.sample_steps, generator=torch.Generator().manual_seed(0))
        trainer.moe.release()
        rows = torch.cat([unpack_images(part["context"], *size), unpack_images(tokens, *size)], dim=3)
        out = trainer.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        grid = torch.cat(list(rows), dim=1)  # [3, 4 H, 2 W]: source | edit per row
        big = grid.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 8x nearest: readable pixels
        plt.imsave(out / f"step-{step:08d}.png", big.permute(1, 2, 0).numpy())

    return on_sample


VARIANTS = {"without_attention_losses": {"scale": 0.0}, "with_attention_losses": {"scale": 1.0}}
METRICS = ("attention_mask_iou", "background_mse", "object_mse")


def run(config: ToyConfig, run_dir: Path) -> dict[str, Any]:
    """Run every variant x seed through ``klcore.experiments``, write the report; return the summary."""
    from klcore.experiments import mean_interval, run_experiment

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    worlds: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.nn.Module]] = {}
    shown: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float]]] = {}

    def one(variant: str, options: dict[str, Any], seed: int, out: Path) -> dict[str, float]:
        if seed not in worlds:  # one world and base model per seed, shared by the variants
            torch.manual_seed(seed)
            train, held = _world(config, run_dir / f"world-seed-{seed}", seed)
            worlds[seed] = (train, held, _pretrain_base(config, train, seed))
        train, held, base = worlds[seed]
        model = copy.deepcopy(base)
        add_style_experts(model, config.styles, style_lora_config(rank=config.rank))
        tc = copy.deepcopy(config.train)
        tc.trainer.seed = seed
        tc.lambda_focus, tc.lambda_cover = tc.lambda_focus * options["scale"], tc.lambda_cover * options["scale"]
        trainer = RegionRouteTrainer(
            model, train, config.styles, tc, run_dir=out, image_size=(config.image_size,) * 2,
            on_sample=_sample_images(held, config),
        )
        history = trainer.train()  # leaves the model unrouted, with its own processors; also in OUT/metrics.jsonl
        for style in config.styles:
            save_expert(model, style, out / "experts" / style)
        model.eval()
        result = _evaluate(model, LoraMoE(model, config.styles), held, config)
        if seed == config.seeds[0]:
            shown[variant] = result
        final: dict[str, float] = {k: history[-1][k] for k in ("attn/focus", "attn/cover", "loss/diffusion") if k in history[-1]}
        return {**{m: result[k] for m, k in zip(METRICS, ("iou", "bg_mse", "object_mse"), strict=True)}, **final}

    exp = run_experiment(
        one, VARIANTS, config.seeds, run_dir / "experiment", title="regionroute-toy: attention losses on vs off",
        figure_metrics=["loss/diffusion", "attn/focus", "attn/cover"],
    )
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "seconds": time.perf_counter() - started, "seeds": config.seeds,
        "expert_steps": config.train.trainer.steps, "styles": config.styles, "eval_examples": config.eval_examples,
    }
    for name in VARIANTS:
        for metric in METRICS:
            mean, low, high = exp.interval(name, metric)
            summary[f"{name}/{metric}"] = mean
            summary[f"{name}/{metric}_ci"] = [low, high]
    for metric in METRICS:  # paired over seeds: same world, base and seed for both variants
        diffs = [exp.runs["with_attention_losses", s][metric] - exp.runs["without_attention_losses", s][metric]
                 for s in config.seeds]
        iv = mean_interval(diffs)
        summary[f"difference/{metric}"] = iv.mean
        summary[f"difference/{metric}_ci"] = [iv.low, iv.high]
        summary[f"difference/{metric}_per_seed"] = diffs
    first = config.seeds[0]
    for name in VARIANTS:  # the first seed's curves, from its log (also when its run was loaded, not rerun)
        log = run_dir / "experiment" / name / f"seed-{first}" / "metrics.jsonl"
        if log.is_file():
            histories[name] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    held = worlds[first][1] if first in worlds else _world(config, run_dir / f"world-seed-{first}", first)[1]
    chance = float(held["masks"][:, :1].mean())
    summary["chance_iou_approx"] = chance / (2 - chance)
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    summary = {k: ([None if isinstance(x, float) and math.isnan(x) else x for x in v] if isinstance(v, list) else v)
               for k, v in summary.items()}
    _report(run_dir, config, summary, shown, histories)
    return summary


def _cell(summary: dict[str, Any], key: str, digits: int) -> str:
    mean, ci = summary[key], summary[f"{key}_ci"]
    if mean is None:
        return "n/a"
    if ci[0] is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _report(run_dir: Path, config: ToyConfig, summary: dict[str, Any], results: dict[str, dict[str, Any]],
            histories: dict[str, list[dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"without_attention_losses": "without attention losses", "with_attention_losses": "with attention losses"}
    panels = [("loss/diffusion", "flow-matching loss"), ("attn/focus", "Focus (KL), training batches"),
              ("attn/cover", "Cover (BCE), training batches")]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.2))
    colours = {"without_attention_losses": "tab:blue", "with_attention_losses": "tab:orange"}
    for name, hist in histories.items():
        for a, (key, _) in zip(ax, panels, strict=True):
            if key in hist[0]:
                a.plot([h[key] for h in hist], label=titles.get(name, name), color=colours.get(name))
    for a, (_, title) in zip(ax, panels, strict=True):
        a.set_title(title, fontsize=9)
        a.set_xlabel("expert step", fontsize=8)
    ax[0].legend(fontsize=7)
    fig.suptitle(f"seed {config.seeds[0]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "losses.png", dpi=100)
    plt.close(fig)

    names = [n for n in VARIANTS if n in results]
    if names:  # the runs of seeds[0] ran in this process (not loaded from a previous, interrupted run)
        rows = min(6, results[names[0]]["maps"].shape[0])
        cols = 2 + 2 * len(names)
        fig, ax = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.6), squeeze=False)
        for i in range(rows):
            first = results[names[0]]
            ax[i, 0].imshow(first["sources"][i].permute(1, 2, 0), interpolation="nearest")
            ax[i, 1].imshow(first["targets"][i].permute(1, 2, 0), interpolation="nearest")
            for j, name in enumerate(names):
                r = results[name]
                ax[i, 2 + 2 * j].imshow(r["maps"][i], cmap="magma", interpolation="nearest")
                ax[i, 2 + 2 * j].contour(r["masks"][i], levels=[0.5], colors="cyan", linewidths=0.8)
                ax[i, 3 + 2 * j].imshow(r["edits"][i].permute(1, 2, 0), interpolation="nearest")
                if i == 0:
                    ax[i, 2 + 2 * j].set_title(f"attention,\n{titles[name]}", fontsize=8)
                    ax[i, 3 + 2 * j].set_title(f"edit,\n{titles[name]}", fontsize=8)
            if i == 0:
                ax[i, 0].set_title("source", fontsize=8)
                ax[i, 1].set_title("target (styled)", fontsize=8)
        for a in ax.flat:
            a.axis("off")
        fig.suptitle(f"held-out examples, seed {config.seeds[0]}; cyan: the object's mask on the token grid", fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "attention_and_edits.png", dpi=100)
        plt.close(fig)

    n = len(config.seeds)
    lines = [
        "# regionroute-toy report", "",
        f"Tiny Flux ({config.dual_blocks}+{config.single_blocks} blocks, {config.heads}x{config.head_dim}), "
        f"{config.image_size}px pixel-space tokens, styles {config.styles}, {config.train_examples} train / "
        f"{config.eval_examples} held-out examples, {config.train.trainer.steps} expert steps, "
        f"{config.base_steps} base pre-training steps, seeds {config.seeds}. Wall time {summary['seconds']:.0f} s.", "",
        f"Means over {n} seeds with 95% t intervals (`experiment/summary.json`).", "",
        "| variant | attention-mask IoU | background MSE | object MSE |", "|---|---|---|---|",
    ]
    for name in VARIANTS:
        lines.append(f"| {name} | {_cell(summary, f'{name}/attention_mask_iou', 3)} | "
                     f"{_cell(summary, f'{name}/background_mse', 4)} | {_cell(summary, f'{name}/object_mse', 4)} |")
    lines += [
        "", "Paired difference (with - without; same world, base model and seed), mean [95% interval] and per seed:", "",
        "| metric | difference | per seed |", "|---|---|---|",
    ]
    for metric in METRICS:
        per = ", ".join(f"{d:+.4f}" for d in summary[f"difference/{metric}_per_seed"])
        lines.append(f"| {metric} | {_cell(summary, f'difference/{metric}', 4)} | {per} |")
    lines += [
        "", f"Chance IoU (random top-|M| pixels) is about {summary['chance_iou_approx']:.3f}.", "",
        "![losses](losses.png)", "", "![attention and edits](attention_and_edits.png)", "",
        "Curves over seeds: `experiment/report.md`.", "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


__all__ = ["METRICS", "VARIANTS", "ToyConfig", "run"]
