"""Training style experts with the attention losses on klcore's accelerate loop.

Flux / Flux Kontext layout (``layout="flux"``): latents are packed ``[n, N, C]`` tokens; the model
sees ``[text | noisy target (N) | context (N)]`` with image ids ``(0, y, x)`` for the target and
``(1, y, x)`` for the context (``reference_context_ids=True``: ``(0, y, x)`` as the reference code);
flow matching with ``x_t = (1 - t) x0 + t eps``, ``t ~ U(0, 1)`` and target ``eps - x0``.

UNet layout (``layout="unet"``): latents ``[n, C, h, w]``; the source latents are concatenated on
channels when the UNet takes ``2 C`` inputs (InstructPix2Pix style); DDPM noising with an epsilon or
v-prediction target.

Each sample is routed to its own style expert (hard per-sample routing, :class:`LoraMoE`) and its
own style tokens and masks feed the Focus / Cover losses. With ``train_router=True`` the experts are
frozen and a soft router (per-layer gates) is trained instead, plus ``balance_weight`` times the
load-balancing term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from klcore.errors import ConfigError, DataError, ShapeError
from klcore.reduce import GlobalCounts
from klcore.trainer import Trainer, TrainerConfig
from regionroute.buckets import BucketBatches
from regionroute.capture import MODES, AttentionStore, register_attention_capture, remove_attention_capture
from regionroute.data import EditTensors
from regionroute.losses import AVERAGING, NORMALIZATIONS, region_attention_loss
from regionroute.moe import LoraMoE, expert_parameters

LAYOUTS = ("flux", "unet")
PREDICTIONS = ("flow", "epsilon", "v_prediction")


@dataclass
class RegionRouteConfig:
    """Loss, capture and data options of a RegionRoute run; ``trainer`` is klcore's loop config."""

    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=100, lr=1e-4, checkpoint_every=0))
    batch_size: int = 2
    layout: str = "flux"
    prediction: str = "flow"
    lambda_focus: float = 0.1
    lambda_cover: float = 5e-5
    tau: float = 0.1
    alpha: float = 2.0
    capture_mode: str = "full"
    average: str = "layer"
    normalize: str = "auto"
    capture_layers: list[str] = field(default_factory=list)
    chunk_size: int = 512
    union_batch_tokens: bool = False
    reference_context_ids: bool = False
    guidance: float = 1.0
    sample_every: int = 0
    train_router: bool = False
    balance_weight: float = 0.01
    router_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.prediction not in PREDICTIONS or (self.layout == "flux") != (self.prediction == "flow"):
            raise ConfigError(f"prediction must be 'flow' for flux and 'epsilon'/'v_prediction' for unet, got {self.prediction!r}")
        if self.capture_mode not in MODES:
            raise ConfigError(f"capture_mode must be one of {MODES}, got {self.capture_mode!r}")
        if self.average not in AVERAGING:
            raise ConfigError(f"average must be one of {AVERAGING}, got {self.average!r}")
        if self.normalize not in ("auto", *NORMALIZATIONS):
            raise ConfigError(f"normalize must be 'auto' or one of {NORMALIZATIONS}, got {self.normalize!r}")
        if min(self.lambda_focus, self.lambda_cover, self.sample_every) < 0 or self.tau <= 0 or self.alpha <= 0:
            raise ConfigError("need lambda_focus, lambda_cover, sample_every >= 0 and tau, alpha > 0")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.guidance > 0:
            raise ConfigError(f"guidance must be > 0, got {self.guidance}")
        if self.balance_weight < 0 or self.router_temperature <= 0:
            raise ConfigError("need balance_weight >= 0 and router_temperature > 0")

    @property
    def map_normalization(self) -> str:
        """``normalize`` with ``"auto"`` resolved: ``"max"`` for full-softmax maps, ``"none"`` for partial."""
        if self.normalize != "auto":
            return self.normalize
        return "max" if self.capture_mode == "full" else "none"

    @property
    def attention_losses(self) -> bool:
        return self.lambda_focus > 0 or self.lambda_cover > 0


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux packing: ``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4 C]`` (2x2 patches, channel ``4 c + 2 dy + dx``, row-major)."""
    if latents.dim() != 4 or latents.shape[-1] % 2 or latents.shape[-2] % 2:
        raise ShapeError(f"latents must be [B, C, h, w] with even h, w, got {tuple(latents.shape)}")
    return F.pixel_unshuffle(latents, 2).flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, N, 4 C]`` -> ``[B, C, height, width]``."""
    if tokens.dim() != 3 or tokens.shape[1] != (height // 2) * (width // 2) or height % 2 or width % 2:
        raise ShapeError(f"tokens {tuple(tokens.shape)} do not fit an even {height}x{width} grid")
    return F.pixel_shuffle(tokens.transpose(1, 2).unflatten(2, (height // 2, width // 2)), 2)


def pack_images(images: torch.Tensor) -> torch.Tensor:
    """Pixel "latents" for the toy: ``[B, 3, H, W]`` in [0, 1] -> ``[B, (H/2)(W/2), 12]`` in [-1, 1] (2x2 patches)."""
    if images.shape[-1] % 2 or images.shape[-2] % 2:
        raise ShapeError(f"image sides must be even, got {tuple(images.shape[-2:])}")
    return pack_latents(images * 2 - 1)


def unpack_images(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_images`: ``[B, N, 12]`` -> ``[B, 3, H, W]`` in [0, 1] (clamped)."""
    return ((unpack_latents(tokens, height, width) + 1) / 2).clamp(0, 1)


def image_ids(height: int, width: int, index: float) -> torch.Tensor:
    """Flux image ids ``[h * w, 3]``: ``(index, y, x)`` for a ``height x width`` token grid."""
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.flatten(0, 1)


def latent_grid(tokens: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The unpacked latent grid ``(h, w)`` of an ``H x W`` image packed to ``tokens = (h/2)(w/2)`` tokens
    (``h = H / f`` for the encoder's downsampling ``f``: 1 for :func:`pack_images`, 8 for Flux's VAE)."""
    height, width = image_hw
    factor = round(math.sqrt(height * width / (4 * tokens)))
    if factor < 1 or height % factor or width % factor or (height // factor // 2) * (width // factor // 2) != tokens:
        raise ShapeError(f"{tokens} packed tokens do not fit a {height}x{width} image at any integer downsampling")
    return height // factor, width // factor


def cache_flux_inputs(
    data: EditTensors,
    encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    encode_images: Callable[[torch.Tensor], torch.Tensor] = pack_images,
) -> dict[str, torch.Tensor]:
    """Precompute what training reads: text ``[n, T, D]``, pooled ``[n, D]``, target/context latents, the
    unpacked latent ``grid [n, 2]`` (:func:`latent_grid`)."""
    with torch.no_grad():
        text, pooled = encode_text(data.prompts)
        latents = encode_images(data.targets).float()
        grid = latent_grid(int(latents.shape[1]), (int(data.targets.shape[2]), int(data.targets.shape[3])))
        return {
            "text": text.float(), "pooled": pooled.float(),
            "latents": latents, "context": encode_images(data.sources).float(),
            "masks": data.masks, "token_indices": data.token_indices, "token_objects": data.token_objects,
            "experts": data.experts, "grid": torch.tensor([grid] * latents.shape[0]),
        }


def save_cache(cache: dict[str, torch.Tensor], path: str | Path) -> None:
    """Atomic safetensors write of a cache from :func:`cache_flux_inputs`."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in cache.items()}, str(tmp))
    tmp.replace(path)


def load_cache(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise DataError(f"no cache at {path}")
    return load_file(str(path))


class RegionRouteTrainer(Trainer):
    """Trains the LoRA experts of ``model`` (added with ``add_style_experts``) on a cached dataset: a dict of
    tensors (:func:`cache_flux_inputs`) or a :class:`regionroute.cache.FluxCache` read shard by shard."""

    mask_key = "valid"
    progress_keys = ("loss/total", "loss/diffusion", "attn/focus")

    def __init__(
        self,
        model: nn.Module,
        cache: dict[str, torch.Tensor] | Any,
        experts: Sequence[str],
        config: RegionRouteConfig,
        *,
        run_dir: str | Path,
        image_size: tuple[int, int] | None = None,
        on_sample: Callable[[RegionRouteTrainer, int], None] | None = None,
    ) -> None:
        n = len(cache) if hasattr(cache, "take") else cache["latents"].shape[0]
        if n == 0:
            raise DataError("the cached dataset is empty")
        self.cfg, self.cache, self.image_size, self.on_sample = config, cache, image_size, on_sample
        self.size = int(n)
        # a bucketed cache: batches drawn within one aspect-ratio bucket, a function of the seed and step
        bucket_of = getattr(cache, "bucket_of", None) if getattr(cache, "buckets", None) else None
        self.batches = None if bucket_of is None else BucketBatches(bucket_of, config.batch_size, config.trainer.seed)
        self.moe = LoraMoE(model, experts, router=config.train_router, temperature=config.router_temperature)
        if config.train_router:  # only the gates learn (train() freezes the rest while it runs)
            model.add_module("regionroute_router", self.moe.gates)
        self.store = AttentionStore(
            config.capture_mode, chunk_size=config.chunk_size, union_batch_tokens=config.union_batch_tokens
        )
        self.captured: list[str] = []
        # the experts (whatever peft's set_adapters left trainable) plus any other parameter the user unfroze
        self._trained = self.moe.router_parameters() if config.train_router else list(
            {id(p): p for p in [*(q for e in experts for q in expert_parameters(model, e)),
                                *(q for q in model.parameters() if q.requires_grad)]}.values()
        )
        params = self._trained
        if not params:
            raise ConfigError("no trainable parameter: add style experts (add_style_experts) before training")
        optimizer = torch.optim.AdamW(params, lr=config.trainer.lr, weight_decay=config.trainer.weight_decay)
        # guidance-distilled transformers (FLUX.1-Kontext-dev) embed a guidance scale: the paper trains at 1
        self.guidance = config.guidance if getattr(getattr(model, "config", None), "guidance_embeds", False) else None
        if config.layout == "unet":
            from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

            self.scheduler_ddpm = DDPMScheduler(num_train_timesteps=1000, prediction_type=config.prediction)
        super().__init__(model, config.trainer, run_dir=run_dir, optimizer=optimizer)

    def train(self) -> list[dict[str, float]]:
        """klcore's loop with the capture processors and the expert routing installed for its duration only.

        Whether it returns or raises, the model is left as it was found: the original attention processors
        (the same objects), no hooks of this trainer, peft's adapter state and ``requires_grad`` flags."""
        model = self.unwrapped_model
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            trained = {id(p) for p in self._trained}
            for p in model.parameters():
                p.requires_grad_(id(p) in trained)
            self.captured = register_attention_capture(model, self.store, layers=self.cfg.capture_layers or None)
            return super().train()
        finally:
            self.store.clear_tokens()
            self.moe.release()
            remove_attention_capture(model)
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))

    def collect(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if self.on_sample is not None and self.cfg.sample_every and step % self.cfg.sample_every == 0:
            self.on_sample(self, step)
        idx = self.batches.batch(step) if self.batches is not None else torch.randint(self.size, (self.cfg.batch_size,))
        cache: Any = self.cache
        batch = cache.take(idx) if hasattr(cache, "take") else {k: v[idx] for k, v in cache.items()}
        batch["valid"] = torch.ones(idx.numel(), 1)
        # time and noise per row drawn with the batch, so micro-batches (accumulation) see the large batch's
        x0 = batch["latents"]
        if self.cfg.layout == "flux":
            batch["t"] = torch.rand(x0.shape[0])
        else:
            batch["t"] = torch.randint(0, self.scheduler_ddpm.config.num_train_timesteps, (x0.shape[0],))
        batch["noise"] = torch.randn_like(x0)
        device = self.accelerator.device
        return {k: v.to(device) for k, v in batch.items()}, {}

    def compute_loss(
        self, batch: dict[str, torch.Tensor], counts: GlobalCounts
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        cfg = self.cfg
        if cfg.train_router:
            self.moe.route_soft()
        else:
            self.moe.route(batch["experts"])
        if cfg.attention_losses:
            self.store.set_tokens(batch["token_indices"], batch["token_indices"] >= 0)
        else:
            self.store.clear_tokens()
        pred, target = (self._flux_forward if cfg.layout == "flux" else self._unet_forward)(batch)
        # this micro-batch's share of the optimiser step's mean over rows (gradient accumulation, DDP)
        share = batch["valid"].shape[0] * counts.world_size / counts.sequences
        diffusion = F.mse_loss(pred.float(), target.float())
        metrics = {"loss/diffusion": float(diffusion.detach())}
        loss = diffusion
        if cfg.attention_losses:
            attn, attn_metrics = region_attention_loss(
                list(self.store.maps.values()), batch["masks"], batch["token_objects"], tau=cfg.tau, alpha=cfg.alpha,
                lambda_focus=cfg.lambda_focus, lambda_cover=cfg.lambda_cover, average=cfg.average,
                grid=self._token_grid(batch), normalize=cfg.map_normalization,
            )
            loss = loss + attn
            metrics.update(attn_metrics)
        if cfg.train_router:
            balance = self.moe.balance_loss()
            loss = loss + cfg.balance_weight * balance
            metrics["router/balance"] = float(balance.detach())
        self.store.clear_tokens()
        return loss * share, metrics, {}

    def _grid(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """The batch's unpacked latent grid ``(h, w)``: its ``grid`` rows (one size per batch) or ``image_size``."""
        if "grid" not in batch:
            if self.image_size is None:
                raise ConfigError("the cache has no 'grid' rows: pass image_size=(h, w), the unpacked latent grid")
            return self.image_size
        grids = {tuple(int(v) for v in row) for row in batch["grid"].tolist()}
        if len(grids) != 1:
            raise ShapeError(f"a batch mixes latent grids {sorted(grids)}: build the cache with buckets= and draw within one")
        grid = grids.pop()
        if self.image_size is not None and tuple(self.image_size) != grid:
            raise ShapeError(f"image_size {tuple(self.image_size)} differs from the cache's grid {grid}; "
                             "pass image_size=None to use the cache's (required with buckets)")
        return grid[0], grid[1]

    def _token_grid(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """The finest attention layer's query grid: Flux's packed grid ``(h/2, w/2)``, the UNet's latent grid."""
        if self.cfg.layout == "flux":
            h, w = self._grid(batch)
            return h // 2, w // 2
        return int(batch["latents"].shape[-2]), int(batch["latents"].shape[-1])

    def _flux_forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x0, ctx, t, noise = batch["latents"], batch["context"], batch["t"], batch["noise"]
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        self.store.target_tokens = x0.shape[1]
        pred = flux_velocity(self.model, xt, ctx, batch["text"], batch["pooled"], t, self._grid(batch),
                             reference_context_ids=self.cfg.reference_context_ids, guidance=self.guidance)
        return pred, noise - x0

    def _unet_forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x0, ctx, t, noise = batch["latents"], batch["context"], batch["t"], batch["noise"]
        sched = self.scheduler_ddpm
        noisy = sched.add_noise(x0, noise, t)
        unet_config: Any = self.unwrapped_model.config  # diffusers' FrozenDict config
        if unet_config.in_channels == 2 * x0.shape[1]:
            noisy = torch.cat([noisy, ctx], 1)
        pred = self.model(noisy, t, encoder_hidden_states=batch["text"]).sample
        target = noise if self.cfg.prediction == "epsilon" else sched.get_velocity(x0, noise, t)
        return pred, target


def flux_velocity(
    model: nn.Module, xt: torch.Tensor, context: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, t: torch.Tensor,
    image_size: tuple[int, int], *, reference_context_ids: bool = False, guidance: float | None = None,
) -> torch.Tensor:
    """The transformer's prediction on ``[text | x_t | context]`` for the target tokens ``[B, N, C]``.

    ``image_size`` is the unpacked grid ``(h, w)`` (tokens ``(h/2)(w/2)``); ``guidance`` is the embedded
    guidance scale of guidance-distilled transformers (``guidance_embeds=True``, e.g. FLUX.1-Kontext-dev;
    pass None for others).
    """
    h, w = image_size[0] // 2, image_size[1] // 2
    if xt.shape[1] != h * w or context.shape != xt.shape:
        raise ShapeError(f"target/context tokens {tuple(xt.shape)}/{tuple(context.shape)} do not fit a {h}x{w} grid")
    ids = torch.cat([image_ids(h, w, 0), image_ids(h, w, 0 if reference_context_ids else 1)]).to(xt.device)
    out = model(
        hidden_states=torch.cat([xt, context], 1), encoder_hidden_states=text, pooled_projections=pooled,
        timestep=t, img_ids=ids, txt_ids=torch.zeros(text.shape[1], 3, device=xt.device), return_dict=False,
        **({} if guidance is None else {"guidance": torch.full((xt.shape[0],), float(guidance), device=xt.device)}),
    )[0]
    return out[:, : xt.shape[1]]


__all__ = [
    "LAYOUTS",
    "PREDICTIONS",
    "RegionRouteConfig",
    "RegionRouteTrainer",
    "cache_flux_inputs",
    "flux_velocity",
    "image_ids",
    "load_cache",
    "pack_images",
    "pack_latents",
    "save_cache",
    "unpack_images",
    "unpack_latents",
]
