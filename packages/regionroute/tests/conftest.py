from __future__ import annotations

import pytest
import torch


def tiny_flux(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    cfg.update(overrides)
    return FluxTransformer2DModel(**cfg).eval()


def flux_inputs(batch: int = 2, image_tokens: int = 16, text_tokens: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, image_tokens, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        img_ids=torch.randn(image_tokens, 3, generator=g),
        txt_ids=torch.randn(text_tokens, 3, generator=g),
        timestep=torch.full((batch,), 0.5),
    )


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    ).eval()


def unet_inputs(batch: int = 2, text_tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor(10),
        encoder_hidden_states=torch.randn(batch, text_tokens, 8, generator=g),
    )


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
