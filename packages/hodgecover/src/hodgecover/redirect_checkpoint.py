"""Saving and loading a redirected model: a stock ``E``-slot checkpoint plus ``redirect.pt``.

``save_pretrained`` of a redirected model already writes a stock checkpoint in which each of the ``E`` routing
slots holds its survivor's weights (``surgery.apply_redirect``); ``save_redirected`` adds ``redirect.pt``
(``{"format", "keep": {layer: [k]}, "redirect": {layer: int64 [E]}}``) and ``load_redirected`` reads both back
into the compact ``k``-expert model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hodgecover.moe import find_moe_layers
from hodgecover.surgery import RedirectRouter, apply_redirect
from klcore.errors import CheckpointError, ConfigError

REDIRECT_FILE = "redirect.pt"
REDIRECT_FORMAT = "hodgecover-redirect/1"


def redirect_state(model: nn.Module) -> dict[str, Any]:
    """The survivors and redirect map of every redirected MoE layer of ``model`` (the ``redirect.pt`` payload)."""
    keep: dict[int, list[int]] = {}
    redirect: dict[int, torch.Tensor] = {}
    for moe in find_moe_layers(model):
        if not isinstance(moe.router, RedirectRouter):
            raise ConfigError(f"layer {moe.index} is not redirected; save a pruned model with save_pretrained")
        router: Any = moe.router
        keep[moe.index] = [int(i) for i in router.keep.tolist()]
        redirect[moe.index] = router.redirect.detach().cpu().clone()
    return {"format": REDIRECT_FORMAT, "keep": keep, "redirect": redirect}


def save_redirected(model: nn.Module, directory: str | Path, **save_kwargs: Any) -> Path:
    """``model.save_pretrained(directory)`` (stock ``E``-slot checkpoint) and ``directory/redirect.pt``."""
    state = redirect_state(model)
    directory = Path(directory)
    model.save_pretrained(directory, **save_kwargs)  # type: ignore[operator]
    torch.save(state, directory / REDIRECT_FILE)
    return directory


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path} is missing or unreadable ({err}); save the model with save_redirected") from err
    if not isinstance(state, dict) or state.get("format") != REDIRECT_FORMAT:
        raise CheckpointError(f"{path} is not a {REDIRECT_FORMAT} file (written by save_redirected); a bare "
                              "{layer: tensor} map from older versions lacks the survivors: re-run the recipe")
    return state


def load_redirected(directory: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """The compact redirected model saved by ``save_redirected``: ``from_pretrained`` then ``apply_redirect``.

    Checks that every slot of the checkpoint holds the weights of the survivor ``redirect.pt`` sends it to, so
    a ``redirect.pt`` beside another checkpoint raises ``CheckpointError`` instead of loading wrong weights.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    state = _read_state(directory / REDIRECT_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained_kwargs)
    keep = {int(k): v for k, v in state["keep"].items()}
    redirect = {int(k): torch.as_tensor(v, dtype=torch.long) for k, v in state["redirect"].items()}
    for moe in find_moe_layers(model):
        if moe.index not in keep:
            raise CheckpointError(f"{directory / REDIRECT_FILE} has no entry for MoE layer {moe.index}")
        source = torch.tensor(keep[moe.index], dtype=torch.long)[redirect[moe.index]]
        for name, p in moe.expert_parameters().items():
            if p.shape[0] != len(source) or not torch.equal(p.data, p.data[source.to(p.device)]):
                raise CheckpointError(
                    f"layer {moe.index}: experts.{name} of {directory} does not hold the tied survivor weights "
                    f"{REDIRECT_FILE} describes; the two files come from different saves"
                )
    return apply_redirect(model, keep, redirect)


__all__ = ["REDIRECT_FILE", "REDIRECT_FORMAT", "load_redirected", "redirect_state", "save_redirected"]
