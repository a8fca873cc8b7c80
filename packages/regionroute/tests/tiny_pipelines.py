"""Tiny, real diffusers pipelines built from configs with random weights (tests only, no hub files).

* :func:`tiny_kontext_pipeline`: ``FluxKontextPipeline`` with a CLIP BPE tokenizer and a T5 Unigram
  tokenizer built in code, ``CLIPTextModel`` / ``T5EncoderModel`` from configs, a 2-level
  ``AutoencoderKL`` (``vae_scale_factor`` 2, 4 latent channels) and a 1+1 block
  ``FluxTransformer2DModel`` (``in_channels`` 16 = 4 latent channels x 2x2 patch). A 16 x 16 image
  gives 8 x 8 latents and 4 x 4 = 16 tokens per image.
* :func:`tiny_sd_pipeline`: ``StableDiffusionImg2ImgPipeline`` (UNet with C = 4 input channels) or
  ``StableDiffusionInstructPix2PixPipeline`` (``2 C`` input channels, train.py's UNet layout).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

CLIP_DIM = 32  # CLIP hidden size = Flux pooled_projection_dim = UNet cross_attention_dim
T5_DIM = 32  # T5 d_model = Flux joint_attention_dim
TEXT_LENGTH = 32  # CLIP model_max_length; pass max_sequence_length=TEXT_LENGTH to the Kontext pipeline
WORDS = ("make", "the", "cat", "dog", "in", "pixel", "ink", "style", "keep", "other", "area", "unchanged")


def clip_tokenizer():
    """``CLIPTokenizer`` from a ``vocab.json`` / ``merges.txt`` written here: byte-level BPE over printable
    ASCII (each character and its end-of-word form) plus merges that make "the" and "in" one token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in (c for c in string.printable if not c.isspace()):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        files = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        files[0].write_text(json.dumps(vocab))
        files[1].write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(files[0]), str(files[1]), model_max_length=TEXT_LENGTH)


def t5_tokenizer():
    """T5-like ``tokenizers`` Unigram (``▁word`` pieces, characters as fallback, Metaspace, ``</s>`` appended)
    wrapped in ``PreTrainedTokenizerFast``; ids: pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS]
    pieces += [(c, -6.0) for c in string.ascii_lowercase + string.digits + ",."]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def text_encoders(seed: int = 0):
    """``(clip_tokenizer, CLIPTextModel, t5_tokenizer, T5EncoderModel)``, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=CLIP_DIM, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=TEXT_LENGTH, projection_dim=CLIP_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )).eval()
    return tok, clip, tok2, t5


def tiny_vae(seed: int = 0, *, flux: bool = True):
    """``AutoencoderKL`` with two levels (scale factor 2) and 4 latent channels; Flux style: shift, no quant convs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=0.6 if flux else 0.18215, shift_factor=0.1 if flux else None,
        use_quant_conv=not flux, use_post_quant_conv=not flux,
    ).eval()


def kontext_transformer(seed: int = 0, *, guidance_embeds: bool = False):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM, guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    ).eval()


def tiny_kontext_pipeline(seed: int = 0, *, guidance_embeds: bool = False, dynamic_shift: bool = False):
    """A real ``FluxKontextPipeline``; ``dynamic_shift=True`` uses FLUX.1's resolution-dependent time shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    tok, clip, tok2, t5 = text_encoders(seed)
    if dynamic_shift:  # FLUX.1-Kontext-dev's scheduler settings
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxKontextPipeline(
        scheduler=scheduler, vae=tiny_vae(seed), text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
        tokenizer_2=tok2, transformer=kontext_transformer(seed, guidance_embeds=guidance_embeds),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(seed: int = 0, *, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CLIP_DIM, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, *, pix2pix: bool = False):
    """``StableDiffusionImg2ImgPipeline`` (UNet with C inputs) or ``StableDiffusionInstructPix2PixPipeline`` (2 C)."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    tok, clip, _, _ = text_encoders(seed)
    cls = StableDiffusionInstructPix2PixPipeline if pix2pix else StableDiffusionImg2ImgPipeline
    pipe = cls(
        vae=tiny_vae(seed, flux=False), text_encoder=clip, tokenizer=tok,
        unet=tiny_unet(seed, in_channels=8 if pix2pix else 4),
        scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
