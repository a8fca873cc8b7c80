"""RegionRoute: attention-supervised regional style LoRA-MoE for diffusion models (diffusers + peft).

Capture (``AttentionStore``, ``register_attention_capture``), losses (``focus_loss``, ``cover_loss``,
``region_attention_loss``), experts and routing (``add_style_experts``, ``LoraMoE``, ``save_expert``,
``load_expert``), metrics (``regional_style_matching``, ``background_metrics``, ...), training
(``RegionRouteTrainer``) and editing (``sample_edit``; ``edit_with_pipeline`` through a real diffusers
``FluxKontextPipeline`` or Stable Diffusion img2img / InstructPix2Pix pipeline).
"""

from regionroute.capture import AttentionStore, register_attention_capture, remove_attention_capture
from regionroute.data import load_records, style_token_indices, word_token_indices
from regionroute.inference import decode_kontext, encode_kontext, flux_shift_mu, sample_edit
from regionroute.losses import cover_loss, focus_loss, region_attention_loss
from regionroute.metrics import (
    LPIPS,
    alexnet_lpips,
    background_lpips,
    background_metrics,
    background_mse,
    background_psnr,
    background_ssim,
    regional_style_matching,
)
from regionroute.moe import LoraMoE, add_style_experts, load_expert, save_expert, style_lora_config
from regionroute.pipelines import edit_with_pipeline, loaded_styles
from regionroute.train import RegionRouteConfig, RegionRouteTrainer

__all__ = [
    "LPIPS",
    "AttentionStore",
    "LoraMoE",
    "RegionRouteConfig",
    "RegionRouteTrainer",
    "add_style_experts",
    "alexnet_lpips",
    "background_lpips",
    "background_metrics",
    "background_mse",
    "background_psnr",
    "background_ssim",
    "cover_loss",
    "decode_kontext",
    "edit_with_pipeline",
    "encode_kontext",
    "flux_shift_mu",
    "focus_loss",
    "load_expert",
    "load_records",
    "loaded_styles",
    "region_attention_loss",
    "regional_style_matching",
    "register_attention_capture",
    "remove_attention_capture",
    "sample_edit",
    "save_expert",
    "style_lora_config",
    "style_token_indices",
    "word_token_indices",
]
