"""dkm's klcore plugin: registers the ``dkm-benchmark`` recipe."""

from __future__ import annotations

from klcore.hookspecs import Component, hookimpl
from klcore.recipes import Recipe


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from dkm import recipe as dkm_recipe

    recipe = Recipe(
        name="dkm-benchmark",
        help="DKM vs NNGP vs GP vs MLP on scikit-learn datasets (90/10 splits, seeds); 2 CPU cores, < 10 min",
        config_class=dkm_recipe.DKMBenchmarkConfig,
        run=dkm_recipe.run,
    )
    return [Component(recipe.name, recipe, help=recipe.help)]
