"""Recipe ``regionroute-toy``: two style experts on a tiny Flux, trained with and without the attention losses.

1. Write a synthetic dataset (coloured shapes; a style is a texture or colour change inside the mask).
2. Pre-train the tiny Flux transformer as an identity editor (target = source), then freeze it.
3. Train two LoRA experts (per-sample hard routing) twice: ``lambda = 0`` and the RegionRoute defaults.
4. Evaluate on held-out examples: attention-mask IoU (full-mode attention of the style token, mean over
   layers, top-|M| pixels vs the mask), background MSE of sampled edits against the source, object
   MSE against the styled target; write ``report.md``, PNG plots and ``summary.json``.
"""

from __future__ import annotations

import copy
import json
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
    eval_examples: int = 16
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
    seed: int = 0
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


def _world(config: ToyConfig, run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tok = WordTokenizer()
    encoder = ToyTextEncoder(len(tok), 32, seed=config.seed)

    def encode_text(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [tok.encode(p) for p in prompts]
        width = max(map(len, ids))
        return encoder(torch.tensor([i + [tok.pad_id] * (width - len(i)) for i in ids]))

    n = config.train_examples + config.eval_examples
    records = load_records(make_toy_dataset(run_dir / "data", n=n, size=config.image_size, styles=config.styles, seed=config.seed))
    cache = cache_flux_inputs(build_tensors(records, tok.encode, config.styles), encode_text)
    train = {k: v[: config.train_examples] for k, v in cache.items()}
    held = {k: v[config.train_examples :] for k, v in cache.items()}
    return train, held


def _pretrain_base(config: ToyConfig, cache: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Full training of the tiny transformer as an identity editor (flow matching, target = source)."""
    size = (config.image_size, config.image_size)
    model = tiny_flux(heads=config.heads, head_dim=config.head_dim, dual=config.dual_blocks, single=config.single_blocks, seed=config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.base_lr)
    g = torch.Generator().manual_seed(config.seed)
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
        plt.imsave(out / f"step-{step:08d}.png", torch.cat(list(rows), dim=1).permute(1, 2, 0).numpy())

    return on_sample


def run(config: ToyConfig, run_dir: Path) -> dict[str, Any]:
    """Build the toy world, train the two variants, evaluate, write the report; return the summary."""
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    train, held = _world(config, run_dir)
    base = _pretrain_base(config, train)
    base_seconds = time.perf_counter() - started
    variants = {"without_attention_losses": 0.0, "with_attention_losses": 1.0}
    results: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    for name, on in variants.items():
        model = copy.deepcopy(base)
        add_style_experts(model, config.styles, style_lora_config(rank=config.rank))
        tc = copy.deepcopy(config.train)
        tc.lambda_focus, tc.lambda_cover = tc.lambda_focus * on, tc.lambda_cover * on
        trainer = RegionRouteTrainer(
            model, train, config.styles, tc, run_dir=run_dir / name, image_size=(config.image_size,) * 2,
            on_sample=_sample_images(held, config),
        )
        histories[name] = trainer.train()  # leaves the model unrouted, with its own processors
        for style in config.styles:
            save_expert(model, style, run_dir / name / "experts" / style)
        model.eval()
        results[name] = _evaluate(model, trainer.moe, held, config)
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "seconds": seconds, "base_pretrain_seconds": base_seconds,
        "expert_steps": config.train.trainer.steps, "styles": config.styles,
    }
    for name, r in results.items():
        summary[f"{name}/attention_mask_iou"] = r["iou"]
        summary[f"{name}/background_mse"] = r["bg_mse"]
        summary[f"{name}/object_mse"] = r["object_mse"]
    chance = float(held["masks"][:, :1].mean())
    summary["chance_iou_approx"] = chance / (2 - chance)
    _report(run_dir, config, summary, results, histories)
    return summary


def _report(run_dir: Path, config: ToyConfig, summary: dict[str, Any], results: dict[str, dict[str, Any]],
            histories: dict[str, list[dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    for name, hist in histories.items():
        ax[0].plot([h["loss/diffusion"] for h in hist], label=name)
        if "attn/focus" in hist[0]:
            ax[1].plot([h["attn/focus"] for h in hist], label=name)
    ax[0].set_title("flow-matching loss")
    ax[1].set_title("Focus (KL) during training")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "losses.png", dpi=100)
    plt.close(fig)

    rows = min(6, results["with_attention_losses"]["maps"].shape[0])
    names = list(results)
    fig, ax = plt.subplots(rows, 2 + len(names) * 2, figsize=(2 * (2 + 2 * len(names)), 2 * rows), squeeze=False)
    for i in range(rows):
        first = results[names[0]]
        ax[i, 0].imshow(first["sources"][i].permute(1, 2, 0))
        ax[i, 1].imshow(first["targets"][i].permute(1, 2, 0))
        for j, name in enumerate(names):
            r = results[name]
            ax[i, 2 + 2 * j].imshow(r["maps"][i], cmap="magma")
            ax[i, 2 + 2 * j].contour(r["masks"][i], levels=[0.5], colors="cyan", linewidths=0.8)
            ax[i, 3 + 2 * j].imshow(r["edits"][i].permute(1, 2, 0))
            if i == 0:
                ax[i, 2 + 2 * j].set_title(f"attn {name[:7]}", fontsize=7)
                ax[i, 3 + 2 * j].set_title(f"edit {name[:7]}", fontsize=7)
        if i == 0:
            ax[i, 0].set_title("source", fontsize=7)
            ax[i, 1].set_title("target", fontsize=7)
    for a in ax.flat:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(run_dir / "attention_and_edits.png", dpi=100)
    plt.close(fig)

    lines = [
        "# regionroute-toy report", "",
        f"Tiny Flux ({config.dual_blocks}+{config.single_blocks} blocks, {config.heads}x{config.head_dim}), "
        f"{config.image_size}px pixel-space tokens, styles {config.styles}, {config.train_examples} train / "
        f"{config.eval_examples} held-out examples, {config.train.trainer.steps} expert steps, "
        f"{config.base_steps} base pre-training steps. Wall time {summary['seconds']:.0f} s.", "",
        "| variant | attention-mask IoU | background MSE | object MSE |", "|---|---|---|---|",
    ]
    for name in results:
        lines.append(
            f"| {name} | {summary[f'{name}/attention_mask_iou']:.3f} | {summary[f'{name}/background_mse']:.4f} "
            f"| {summary[f'{name}/object_mse']:.4f} |"
        )
    lines += [
        "", f"Chance IoU (random top-|M| pixels) is about {summary['chance_iou_approx']:.3f}.", "",
        "![losses](losses.png)", "", "![attention and edits](attention_and_edits.png)", "",
        "Config:", "```json", json.dumps(summary | {"config": "see recipe.json"}, indent=1), "```",
    ]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


__all__ = ["ToyConfig", "run"]
