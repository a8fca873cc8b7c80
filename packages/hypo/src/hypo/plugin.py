"""klcore plugin of hypo: the DPO-family objectives and the ``hypo-toy`` recipe."""

from __future__ import annotations

from hypo.losses import OBJECTIVES, preference_objective
from klcore.hookspecs import Component, hookimpl


@hookimpl
def klcore_register_losses() -> list[Component]:
    return [
        Component(name, preference_objective(kind), help=f"DPO-family loss {kind!r} (TRL loss_type), for HyPOTrainer")
        for name, kind in OBJECTIVES.items()
    ]


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from hypo import toy_recipe
    from klcore.recipes import Recipe

    recipe = Recipe(
        name="hypo-toy",
        help="DPO vs HyPO from the same seeds on a synthetic preference task (toy addition); reward and reverse KL",
        config_class=toy_recipe.HyPOToyConfig,
        run=toy_recipe.run,
    )
    return [Component(recipe.name, recipe, help=recipe.help)]
