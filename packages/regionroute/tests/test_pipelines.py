"""Editing through real diffusers pipelines (tiny, random weights, tokenizers built in code)."""

from __future__ import annotations

import pytest
import torch
from regionroute.inference import decode_kontext, encode_kontext, flow_times, flux_shift_mu, sample_edit
from regionroute.moe import LoraMoE, add_style_experts, save_expert, style_lora_config
from regionroute.pipelines import edit_with_pipeline, loaded_styles, pipeline_kind
from regionroute.train import pack_latents, unpack_latents
from tiny_pipelines import TEXT_LENGTH, kontext_transformer, tiny_kontext_pipeline, tiny_sd_pipeline, tiny_unet

from klcore.errors import ConfigError, DataError, ShapeError, UnsupportedModelError

STYLES = ["pixel", "ink"]
PROMPTS = ["make the cat in pixel style", "make the dog in ink style"]
KONTEXT = dict(num_inference_steps=3, max_sequence_length=TEXT_LENGTH, guidance_scale=2.5, output_type="latent")


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    """Experts with random (non-zero) B saved by save_expert: ``{"flux" | "unet" | "pix2pix": {style: dir}}``."""
    root = tmp_path_factory.mktemp("experts")
    models = {"flux": kontext_transformer(0), "unet": tiny_unet(0), "pix2pix": tiny_unet(0, in_channels=8)}
    dirs = {}
    for kind, model in models.items():
        add_style_experts(model, STYLES, style_lora_config(init=False))
        dirs[kind] = {s: root / kind / s for s in STYLES}
        for style in STYLES:
            save_expert(model, style, dirs[kind][style])
    return dirs


def images(batch=2, size=16, seed=3):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def noise(batch=2, seed=4):  # packed Kontext latents of a 16 x 16 image: 4 x 4 tokens of 4 x 4 channels
    return torch.randn(batch, 16, 16, generator=torch.Generator().manual_seed(seed))


def kontext_with_experts(expert_dirs, **kwargs):
    pipe = tiny_kontext_pipeline(0, **kwargs)
    for style in STYLES:
        pipe.load_lora_weights(str(expert_dirs["flux"][style]), adapter_name=style)
    return pipe


def kontext_edit(pipe, **kwargs):
    return edit_with_pipeline(pipe, images(), PROMPTS, latents=noise(), **KONTEXT, **kwargs).images


def test_pack_and_vae_steps_match_the_kontext_pipeline():
    pipe = tiny_kontext_pipeline(0)
    z = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(pack_latents(z), pipe._pack_latents(z, 2, 4, 8, 6), atol=0, rtol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(z), 8, 6), z, atol=0, rtol=0)
    x = images()
    expected = pipe._pack_latents(pipe._encode_vae_image(x * 2 - 1, generator=None), 2, 4, 8, 8)
    torch.testing.assert_close(encode_kontext(pipe.vae, x), expected, atol=1e-6, rtol=1e-5)
    tokens = torch.randn(2, 16, 16)
    latents = pipe._unpack_latents(tokens, 16, 16, pipe.vae_scale_factor) / 0.6 + 0.1
    expected = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pt")
    torch.testing.assert_close(decode_kontext(pipe.vae, tokens, 16, 16), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_kontext_pipeline_denoising_equals_sample_edit(dynamic_shift):
    # same transformer, context latents, initial noise and times: the pipeline's Euler steps are sample_edit's
    pipe = tiny_kontext_pipeline(0, guidance_embeds=True, dynamic_shift=dynamic_shift)
    text, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=TEXT_LENGTH)
    context = encode_kontext(pipe.vae, images())
    mu = flux_shift_mu(16) if dynamic_shift else None
    ref = sample_edit(pipe.transformer, context, text, pooled, (8, 8), steps=3, noise=noise(), mu=mu, guidance=2.5)
    out = kontext_edit(pipe)
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor(flow_times(3, mu)), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    decoded = edit_with_pipeline(pipe, images(), PROMPTS, latents=noise(), **{**KONTEXT, "output_type": "pt"}).images
    assert decoded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, decode_kontext(pipe.vae, ref, 16, 16), atol=1e-5, rtol=1e-4)
    other = sample_edit(pipe.transformer, context, text, pooled, (8, 8), steps=3, noise=noise(),
                        mu=None if dynamic_shift else 1.0, guidance=2.5)
    assert not torch.allclose(other, ref, atol=1e-4)  # the time shift matters
    # the context really conditions the edit: other source latents give another result
    moved = sample_edit(pipe.transformer, context.flip(1), text, pooled, (8, 8), steps=3, noise=noise(), mu=mu,
                        guidance=2.5)
    assert not torch.allclose(moved, ref, atol=1e-4)


def test_kontext_style_expert_loaded_from_save_expert(expert_dirs):
    pipe = tiny_kontext_pipeline(0)
    base = kontext_edit(pipe)
    for style in STYLES:
        pipe.load_lora_weights(str(expert_dirs["flux"][style]), adapter_name=style)
    assert loaded_styles(pipe) == STYLES
    pixel, ink = kontext_edit(pipe, style="pixel"), kontext_edit(pipe, style="ink")
    assert pixel.shape == base.shape == (2, 16, 16) and torch.isfinite(pixel).all()
    assert not torch.allclose(pixel, base, atol=1e-3) and not torch.allclose(pixel, ink, atol=1e-3)
    pipe.disable_lora()
    torch.testing.assert_close(kontext_edit(pipe), base)  # peft state restored: the base model again
    torch.testing.assert_close(kontext_edit(pipe, style="pixel"), pixel)  # style= re-enables the expert
    image = edit_with_pipeline(pipe, images(1), PROMPTS[0], style="ink", **{**KONTEXT, "output_type": "pt"}).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_kontext_hard_routing_equals_set_adapters(expert_dirs):
    pipe = kontext_with_experts(expert_dirs)
    pixel, ink = kontext_edit(pipe, style="pixel"), kontext_edit(pipe, style="ink")
    moe = LoraMoE(pipe.transformer, STYLES)
    torch.testing.assert_close(kontext_edit(pipe, style="pixel", moe=moe), pixel, atol=1e-5, rtol=1e-4)
    mixed = kontext_edit(pipe, style=["ink", "pixel"], moe=moe)  # one expert per sample in one batch
    torch.testing.assert_close(mixed[0], ink[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], pixel[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kontext_edit(pipe, style="ink"), ink)  # moe released: peft's adapters again


def test_kontext_router_through_the_pipeline(expert_dirs):
    pipe = kontext_with_experts(expert_dirs)
    moe = LoraMoE(pipe.transformer, STYLES, router=True)  # zero-initialised gates: uniform 1/2, 1/2
    uniform = kontext_edit(pipe, moe=moe, router=True)
    assert torch.isfinite(uniform).all() and moe.last_gates
    for gate in moe.last_gates:
        torch.testing.assert_close(gate, torch.full_like(gate, 0.5))
    pipe.set_adapters(STYLES, [0.5, 0.5])  # the same mixture through peft
    torch.testing.assert_close(uniform, kontext_edit(pipe), atol=1e-5, rtol=1e-4)
    for gate in moe.gates.values():
        torch.nn.init.normal_(gate.proj.weight, std=5.0)
    learned = kontext_edit(pipe, moe=moe, router=True)
    assert torch.isfinite(learned).all() and not torch.allclose(learned, uniform, atol=1e-4)
    for gate in moe.last_gates:
        torch.testing.assert_close(gate.sum(-1), torch.ones(gate.shape[:-1]))


@pytest.mark.parametrize("pix2pix", [False, True])
def test_unet_pipelines_with_experts_and_hard_routing(expert_dirs, pix2pix):
    pipe = tiny_sd_pipeline(0, pix2pix=pix2pix)
    assert pipeline_kind(pipe) == ("pix2pix" if pix2pix else "img2img")

    def edit(**kwargs):  # classifier-free guidance on: the UNet sees 2 (img2img) or 3 (pix2pix) copies of the batch
        kwargs.setdefault("output_type", "latent")
        return edit_with_pipeline(pipe, images(), PROMPTS, num_inference_steps=3, guidance_scale=5.0,
                                  generator=torch.Generator().manual_seed(5), **kwargs).images

    base = edit()
    for style in STYLES:
        pipe.load_lora_weights(str(expert_dirs["pix2pix" if pix2pix else "unet"][style]), adapter_name=style)
    pixel, ink = edit(style="pixel"), edit(style="ink")
    assert pixel.shape == base.shape == (2, 4, 8, 8) and torch.isfinite(pixel).all()
    assert not torch.allclose(pixel, base, atol=1e-4) and not torch.allclose(pixel, ink, atol=1e-4)
    moe = LoraMoE(pipe.unet, STYLES)
    torch.testing.assert_close(edit(style="pixel", moe=moe), pixel, atol=1e-5, rtol=1e-4)
    mixed = edit(style=["ink", "pixel"], moe=moe)
    torch.testing.assert_close(mixed[0], ink[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], pixel[1], atol=1e-5, rtol=1e-4)
    image = edit(style="ink", output_type="pt")
    assert image.shape == (2, 3, 16, 16) and torch.isfinite(image).all()


def test_bad_inputs_raise_klcore_errors(expert_dirs):
    from diffusers import FluxPipeline, StableDiffusionImg2ImgPipeline

    pipe = tiny_kontext_pipeline(0)
    with pytest.raises(ConfigError, match="none: load experts"):
        kontext_edit(pipe, style="pixel")
    for style in STYLES:
        pipe.load_lora_weights(str(expert_dirs["flux"][style]), adapter_name=style)
    with pytest.raises(ConfigError, match=r"\['pixel', 'ink'\]"):
        kontext_edit(pipe, style="oil")
    with pytest.raises(UnsupportedModelError):
        edit_with_pipeline(FluxPipeline(**pipe.components), images(), PROMPTS)
    with pytest.raises(UnsupportedModelError, match="InstructPix2Pix"):
        wrong = StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline(0, pix2pix=True).components)  # 2C-channel UNet
        edit_with_pipeline(wrong, images(), PROMPTS)
    with pytest.raises(ShapeError, match="divisible by 4"):
        edit_with_pipeline(pipe, images(size=18), PROMPTS)
    with pytest.raises(ShapeError, match="differs"):
        edit_with_pipeline(pipe, images(), PROMPTS, height=32, width=32)
    with pytest.raises(ShapeError, match="one size"):
        edit_with_pipeline(pipe, [images(1)[0], images(1, size=8)[0]], PROMPTS)
    with pytest.raises(ConfigError, match="_auto_resize"):
        edit_with_pipeline(pipe, images(), PROMPTS, _auto_resize=True)
    with pytest.raises(DataError):
        edit_with_pipeline(pipe, None, PROMPTS)
    with pytest.raises(ConfigError):
        kontext_edit(pipe, style=["pixel", "ink"])  # per-sample styles need a LoraMoE
    with pytest.raises(ConfigError):
        kontext_edit(pipe, router=True)
    moe = LoraMoE(pipe.transformer, STYLES)
    with pytest.raises(ConfigError):
        kontext_edit(pipe, moe=moe)  # neither style nor router
    with pytest.raises(ConfigError):
        kontext_edit(pipe, moe=moe, router=True)  # built without router
    with pytest.raises(ConfigError, match="experts"):
        kontext_edit(pipe, moe=moe, style="oil")
    with pytest.raises(ShapeError, match="3 styles for 2 prompts"):
        kontext_edit(pipe, moe=moe, style=["pixel", "ink", "ink"])
    other = kontext_transformer(0)
    add_style_experts(other, STYLES)
    with pytest.raises(ConfigError, match="another model"):
        kontext_edit(pipe, moe=LoraMoE(other, STYLES), style="ink")
    guided = kontext_transformer(0, guidance_embeds=True)
    context, text, pooled = torch.zeros(1, 16, 16), torch.zeros(1, 5, 32), torch.zeros(1, 32)
    with pytest.raises(ConfigError, match="guidance"):
        sample_edit(guided, context, text, pooled, (8, 8), steps=2)
    with pytest.raises(ShapeError):
        sample_edit(guided, context, text, pooled, (8, 8), noise=torch.zeros(1, 4, 16), guidance=1.0)
    with pytest.raises(ShapeError):
        pack_latents(torch.zeros(1, 4, 7, 8))
