"""klcore's built-in plugin: the ``vanilla`` policy loss, the rewards and tasks of ``klcore.rewards`` and
``klcore.tasks``, and the ``grpo-toy``, ``grpo`` and ``evaluate`` recipes.

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
def klcore_register_rewards() -> list[Component]:
    from klcore.rewards import BUILTIN_REWARDS

    return [Component(name, factory, help=text) for name, (factory, text) in BUILTIN_REWARDS.items()]


@hookimpl
def klcore_register_tasks() -> list[Component]:
    from klcore.tasks import BUILTIN_TASKS

    return [Component(name, factory, help=text) for name, (factory, text) in BUILTIN_TASKS.items()]


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from klcore import grpo_toy, lm_recipes

    recipes = [
        Recipe(
            name="grpo-toy",
            help="SFT warm-up then GRPO on toy 2-digit addition; tiny Llama, 2 CPU cores, < 3 min",
            config_class=grpo_toy.GRPOToyConfig,
            run=grpo_toy.run,
        ),
        Recipe(
            name="grpo",
            help="GRPO on any causal LM (model=NAME_OR_FOLDER) and prompt dataset (data.path=...), optional LoRA",
            config_class=lm_recipes.GRPORecipeConfig,
            run=lm_recipes.run_grpo,
        ),
        Recipe(
            name="evaluate",
            help="pass@1 and pass@k with 95% intervals of a model (model=...) on a prompt dataset",
            config_class=lm_recipes.EvaluateConfig,
            run=lm_recipes.run_evaluate,
        ),
    ]
    return [Component(recipe.name, recipe, help=recipe.help) for recipe in recipes]
