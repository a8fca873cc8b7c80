"""Mask-free regional editing through real diffusers pipelines with a style expert or the router.

Supported: ``FluxKontextPipeline`` (the reference's backbone) and, for UNet experts,
``StableDiffusionImg2ImgPipeline`` (UNet with ``C`` latent input channels) or
``StableDiffusionInstructPix2PixPipeline`` (``2 C`` channels: source latents concatenated, train.py's
UNet layout). :func:`edit_with_pipeline` picks the expert in one of three ways:

* ``style="pixel"``: peft's ``pipe.set_adapters(["pixel"], [1.0])`` on experts loaded with
  ``pipe.load_lora_weights(dir, adapter_name="pixel")`` (the reference's ``inference.py``);
* ``moe=LoraMoE(pipe.transformer, styles)`` and ``style=`` a name or one name per prompt: hard
  routing, each sample its own expert, in one batch;
* ``moe=LoraMoE(..., router=True)`` and ``router=True``: the learned soft router.

With ``moe`` a forward pre-hook on the denoiser re-arms the routing before every call, repeating the
per-sample choice over the classifier-free-guidance copies the pipeline stacks on the batch
(``[uncond, cond]`` for img2img, ``[cond, uncond, uncond]`` for InstructPix2Pix); afterwards the hook
is removed and ``moe.release()`` hands the LoRA layers back to peft.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torch import nn

from klcore.errors import ConfigError, DataError, ShapeError, UnsupportedModelError
from regionroute.moe import LoraMoE

PIPELINES = ("FluxKontextPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInstructPix2PixPipeline")


def pipeline_kind(pipe: Any) -> str:
    """``"kontext"``, ``"img2img"`` or ``"pix2pix"``; other pipelines raise ``UnsupportedModelError``."""
    from diffusers import FluxKontextPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    for cls, kind in ((FluxKontextPipeline, "kontext"), (StableDiffusionImg2ImgPipeline, "img2img"),
                      (StableDiffusionInstructPix2PixPipeline, "pix2pix")):
        if isinstance(pipe, cls):
            return kind
    raise UnsupportedModelError(f"editing supports {', '.join(PIPELINES)}; got {type(pipe).__name__}")


def pipeline_denoiser(pipe: Any) -> nn.Module:
    """The pipeline's transformer (Kontext) or UNet, the module the style experts adapt."""
    model: nn.Module = pipe.transformer if pipeline_kind(pipe) == "kontext" else pipe.unet
    return model


def loaded_styles(pipe: Any) -> list[str]:
    """Names of the LoRA adapters loaded on the pipeline's denoiser (``load_lora_weights(..., adapter_name=)``)."""
    return list(getattr(pipeline_denoiser(pipe), "peft_config", {}) or {})


def edit_with_pipeline(
    pipe: Any,
    image: Any,
    prompt: str | Sequence[str] | None = None,
    *,
    style: str | Sequence[str] | None = None,
    moe: LoraMoE | None = None,
    router: bool = False,
    **pipe_kwargs: Any,
) -> Any:
    """Run ``pipe(image=image, prompt=prompt, **pipe_kwargs)`` with the chosen expert; returns the pipeline's output.

    ``image``: PIL image, ``[B, 3, H, W]`` / ``[3, H, W]`` tensor in [0, 1], ``[H, W, 3]`` array, a list of
    them (same size), or latents (``[B, C_latent, h, w]``). Its sides must be multiples of the
    pipeline's factor (``2 * vae_scale_factor`` for Kontext, ``vae_scale_factor`` for UNet), otherwise
    the pipeline would resize silently. Kontext: the output has the image's size (``height``/``width``/
    ``max_area`` default to it, ``_auto_resize=False``), so target and context share one token grid as in
    training. ``style=None`` without ``moe`` runs the pipeline with peft's current adapters.
    """
    kind = pipeline_kind(pipe)
    denoiser = pipeline_denoiser(pipe)
    _check_layout(pipe, kind)
    _check_image(pipe, kind, image, pipe_kwargs)
    rows = _batch_size(prompt, pipe_kwargs)
    if moe is None:
        if router:
            raise ConfigError("router=True needs moe=LoraMoE(pipe denoiser, styles, router=True)")
        if style is not None:
            if not isinstance(style, str):
                raise ConfigError("one style per prompt needs moe=LoraMoE(...); peft's set_adapters applies one to all")
            _check_names([style], loaded_styles(pipe), "loaded adapters")
            pipe.enable_lora()
            pipe.set_adapters([style], [1.0])
        return pipe(image=image, prompt=prompt, **pipe_kwargs)
    if not isinstance(moe, LoraMoE):
        raise ConfigError(f"moe must be a regionroute.LoraMoE, got {type(moe).__name__}")
    inside = {id(m) for m in denoiser.modules()}
    if not all(id(layer) in inside for _, layer in moe.layers):
        raise ConfigError("moe was built on another model: build it on pipe.transformer / pipe.unet")
    index = _route_index(moe, style, router, rows, pipe_kwargs)

    def arm(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if index is None:
            moe.route_soft()  # also clears last_gates: they hold the last call's gates
            return
        if x is None or x.shape[0] % index.shape[0]:
            rows_seen = None if x is None else x.shape[0]
            raise ShapeError(f"denoiser batch {rows_seen} is not a multiple of the {index.shape[0]} routed samples")
        moe.route(index.repeat(x.shape[0] // index.shape[0]))

    handle = denoiser.register_forward_pre_hook(arm, with_kwargs=True)
    try:
        return pipe(image=image, prompt=prompt, **pipe_kwargs)
    finally:
        handle.remove()
        moe.release()


def _check_names(names: Sequence[str], available: Sequence[str], what: str) -> None:
    unknown = [n for n in names if n not in available]
    if unknown:
        hint = "" if available else " (none: load experts with pipe.load_lora_weights(dir, adapter_name=style))"
        raise ConfigError(f"unknown style(s) {unknown}; {what}: {list(available)}{hint}")


def _route_index(
    moe: LoraMoE, style: str | Sequence[str] | None, router: bool, rows: int, kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """Per-sample expert index ``[rows]`` for hard routing, ``None`` for the router."""
    if router:
        if style is not None:
            raise ConfigError("pass either style= (hard routing) or router=True, not both")
        if not len(moe.gates):
            raise ConfigError("router=True needs a LoraMoE built with router=True")
        return None
    if style is None:
        raise ConfigError("with moe=, pass style= (a name or one per prompt) or router=True")
    styles = [style] if isinstance(style, str) else list(style)
    _check_names(styles, moe.experts, "the LoraMoE's experts")
    per_prompt = int(kwargs.get("num_images_per_prompt") or 1)
    prompts = rows // per_prompt
    if len(styles) == 1:
        styles = styles * prompts
    if len(styles) != prompts:
        raise ShapeError(f"got {len(styles)} styles for {prompts} prompts: pass one style or one per prompt")
    return torch.tensor([moe.experts.index(s) for s in styles]).repeat_interleave(per_prompt)


def _batch_size(prompt: Any, kwargs: dict[str, Any]) -> int:
    per_prompt = kwargs.get("num_images_per_prompt") or 1
    if isinstance(prompt, str):
        prompts = 1
    elif prompt is not None:
        prompts = len(prompt)
    elif kwargs.get("prompt_embeds") is not None:
        prompts = kwargs["prompt_embeds"].shape[0]
    else:
        raise ConfigError("pass prompt= or prompt_embeds=")
    if prompts < 1 or per_prompt < 1:
        raise ConfigError(f"need at least one prompt and num_images_per_prompt >= 1, got {prompts}, {per_prompt}")
    return int(prompts * per_prompt)


def _check_layout(pipe: Any, kind: str) -> None:
    if kind == "kontext":
        return
    channels, latent = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
    expected = 2 * latent if kind == "pix2pix" else latent
    if channels != expected:
        other = "StableDiffusionImg2ImgPipeline" if kind == "pix2pix" else "StableDiffusionInstructPix2PixPipeline"
        raise UnsupportedModelError(
            f"{type(pipe).__name__} needs a UNet with {expected} input channels, this one has {channels}; use {other}"
        )


def _hw(item: Any) -> tuple[int, int, int | None]:
    """``(H, W, channels or None)`` of a PIL image, ``[..., C, H, W]`` tensor or ``[..., H, W, C]`` array."""
    if isinstance(item, torch.Tensor):
        if item.dim() not in (3, 4):
            raise ShapeError(f"an image tensor must be [C, H, W] or [B, C, H, W], got {tuple(item.shape)}")
        return int(item.shape[-2]), int(item.shape[-1]), int(item.shape[-3])
    if isinstance(item, PIL.Image.Image):
        return int(item.height), int(item.width), None
    shape = getattr(item, "shape", None)
    if shape is None or len(shape) not in (3, 4):
        raise DataError(f"image must be a PIL image, tensor or [H, W, C] array, or a list; got {type(item).__name__}")
    return int(shape[-3]), int(shape[-2]), None


def _check_image(pipe: Any, kind: str, image: Any, kwargs: dict[str, Any]) -> None:
    if image is None:
        raise DataError("image is required: the source image to edit")
    items = list(image) if isinstance(image, list) else [image]
    if not items:
        raise DataError("image is an empty list")
    sizes = {_hw(item) for item in items}
    if len(sizes) > 1:
        raise ShapeError(f"images must share one size, got {sorted(s[:2] for s in sizes)}")
    height, width, channels = sizes.pop()
    factor = pipe.vae_scale_factor
    latent_channels = pipe.latent_channels if kind == "kontext" else 4  # diffusers' SD pipelines test for 4
    if channels == latent_channels:  # latents: the pipeline skips the VAE
        height, width = height * factor, width * factor
    multiple = 2 * factor if kind == "kontext" else factor
    if height % multiple or width % multiple:
        raise ShapeError(
            f"image is {height}x{width}; {type(pipe).__name__} needs sides divisible by {multiple} (it would resize "
            "the source silently and the edit would not align with it): resize or crop it first"
        )
    if kind != "kontext":
        return
    kwargs.setdefault("height", height)
    kwargs.setdefault("width", width)
    kwargs.setdefault("max_area", height * width)
    kwargs.setdefault("_auto_resize", False)
    if (kwargs["height"], kwargs["width"]) != (height, width):
        raise ShapeError(
            f"height x width {kwargs['height']}x{kwargs['width']} differs from the image's {height}x{width}: a "
            "regional edit keeps the source's grid (resize the image instead)"
        )
    if kwargs["max_area"] != height * width or kwargs["_auto_resize"]:
        raise ConfigError(
            "max_area must be height * width and _auto_resize False (the pipeline would rescale the output or the "
            "context); resize the image to a Kontext resolution beforehand"
        )


__all__ = ["PIPELINES", "edit_with_pipeline", "loaded_styles", "pipeline_denoiser", "pipeline_kind"]
