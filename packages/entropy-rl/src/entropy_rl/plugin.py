"""klcore plugin of entropy-rl (entry point ``entropy_rl``): losses, the dynamics probe and recipes."""

from __future__ import annotations

from entropy_rl.dynamics import EntropyDynamics
from entropy_rl.losses import clip_cov_loss, kl_cov_loss
from klcore.hookspecs import Component, hookimpl
from klcore.recipes import Recipe


@hookimpl
def klcore_register_losses() -> list[Component]:
    return [
        Component("clip_cov", clip_cov_loss, help="Clip-Cov: detach a random share of high-covariance tokens (Cui et al.)"),
        Component("kl_cov", kl_cov_loss, help="KL-Cov: |log ratio| penalty on the top-covariance tokens (Cui et al.)"),
    ]


@hookimpl
def klcore_register_metrics() -> list[Component]:
    return [
        Component(
            "entropy_dynamics", EntropyDynamics,
            help="per step: entropy, log-prob/advantage covariance, predicted vs measured entropy change",
        )
    ]


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from entropy_rl import law_recipe, toy_recipe

    recipes = [
        Recipe(
            name="entropy-toy",
            help="GRPO vs Clip-Cov vs KL-Cov on toy addition from one warm-up; entropy/reward/law report (< 10 min, 2 CPUs)",
            config_class=toy_recipe.EntropyToyConfig,
            run=toy_recipe.run,
        ),
        Recipe(
            name="entropy-law",
            help="fit R = -a exp(H) + b to a run's metrics (--set metrics=RUN_DIR); plot and summary",
            config_class=law_recipe.EntropyLawConfig,
            run=law_recipe.run,
        ),
    ]
    return [Component(r.name, r, help=r.help) for r in recipes]
