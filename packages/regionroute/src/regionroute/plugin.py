"""klcore plugin of regionroute: the ``regionroute-toy`` and ``regionroute-eval`` recipes."""

from __future__ import annotations

from klcore.hookspecs import Component, hookimpl
from klcore.recipes import Recipe


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from regionroute import recipe_eval, recipe_toy

    recipes = [
        Recipe(
            name="regionroute-toy",
            help="two style LoRA experts on a tiny Flux, with vs without Focus/Cover losses; 2 CPU cores, < 10 min",
            config_class=recipe_toy.ToyConfig,
            run=recipe_toy.run,
        ),
        Recipe(
            name="regionroute-eval",
            help="RSM (CLIP) and background LPIPS / MSE / PSNR / SSIM of edited images (offline demo by default)",
            config_class=recipe_eval.EvalConfig,
            run=recipe_eval.run,
        ),
    ]
    return [Component(r.name, r, help=r.help) for r in recipes]
