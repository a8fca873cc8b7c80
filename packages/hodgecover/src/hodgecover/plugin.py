"""klcore plugin of hodgecover: registers the ``hodge-toy`` and ``hodgecover`` recipes."""

from __future__ import annotations

from klcore.hookspecs import Component, hookimpl
from klcore.recipes import Recipe


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from hodgecover import checkpoint_recipe, toy_recipe

    recipes = [
        Recipe(
            name="hodge-toy",
            help="experiment: 3 seeds of a tiny 16-expert MoE (load balancing), every method at 33%/66%, diagnostics first",
            config_class=toy_recipe.HodgeToyConfig,
            run=toy_recipe.run,
        ),
        Recipe(
            name="hodgecover",
            help="HodgeCover expert reduction of a checkpoint folder: --set model=PATH --set ratio=0.5 "
            "--set calibration=FILE",
            config_class=checkpoint_recipe.CheckpointConfig,
            run=checkpoint_recipe.run,
        ),
    ]
    return [Component(r.name, r, help=r.help) for r in recipes]
