"""klcore's built-in plugin: the ``vanilla`` policy loss and the ``grpo-toy`` recipe.

Loaded by ``build_plugin_manager`` through the same path as entry-point plugins.
"""

from __future__ import annotations

from klcore.hookspecs import Component, hookimpl
from klcore.losses import ppo_clip_loss
from klcore.recipes import Recipe


@hookimpl
def klcore_register_losses() -> list[Component]:
    return [Component("vanilla", ppo_clip_loss, help="PPO clipped surrogate (clip_low / clip_high)")]


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from klcore import grpo_toy

    recipe = Recipe(
        name="grpo-toy",
        help="SFT warm-up then GRPO on toy 2-digit addition; tiny Llama, 2 CPU cores, < 3 min",
        config_class=grpo_toy.GRPOToyConfig,
        run=grpo_toy.run,
    )
    return [Component(recipe.name, recipe, help=recipe.help)]
