"""opd-distill's klcore plugin: the distillation objectives (losses) and the recipes."""

from __future__ import annotations

from klcore.hookspecs import Component, hookimpl
from opd_distill.objectives import OBJECTIVES

_HELP = {
    "opd_reinforce": "VLA-OPD: sampled-token reward -(log S - log T) as raw advantage, REINFORCE",
    "opd_ppo": "VLA-OPD: reward frozen at rollout, PPO-clipped ratio",
    "full_reverse_kl": "full-vocabulary KL(S || T), chunked",
    "full_forward_kl": "full-vocabulary KL(T || S), chunked",
    "full_jsd": "GKD generalised JSD(beta) (loss_options.beta), chunked",
    "hard_ce": "cross-entropy on the teacher's argmax token",
}


@hookimpl
def klcore_register_losses() -> list[Component]:
    return [Component(name, fn, help=_HELP[name]) for name, fn in OBJECTIVES.items()]


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from klcore.recipes import Recipe
    from opd_distill import env_recipe, paced_recipe

    recipes = [
        Recipe(
            name="opd-env-toy",
            help="VLA-OPD on a toy pick-the-block env: BC student vs reverse-KL OPD, forward KL, hard CE, teacher",
            config_class=env_recipe.OPDEnvToyConfig,
            run=env_recipe.run,
        ),
        Recipe(
            name="paced-toy",
            help="PACED on toy addition: unweighted FKL, hard filter, PACED FKL, PACED FKL then RKL (pass@1)",
            config_class=paced_recipe.PacedToyConfig,
            run=paced_recipe.run,
        ),
    ]
    return [Component(r.name, r, help=r.help) for r in recipes]
