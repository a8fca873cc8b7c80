"""klcore entry point of divergence-rl: the ``dph`` regulariser, the ``pass_at_k`` and
``rehearsal_divergence`` metrics, and the ``dph-presample`` / ``dph-toy`` recipes."""

from __future__ import annotations

from klcore import Component, hookimpl


@hookimpl
def klcore_register_regularisers() -> list[Component]:
    from divergence_rl.regulariser import DPHRegulariser

    return [Component("dph", DPHRegulariser,
                      help="DPH-RL: eta x f-divergence to the initial policy on stored rehearsal responses")]


@hookimpl
def klcore_register_metrics() -> list[Component]:
    from divergence_rl.evaluation import PassAtKMetric
    from divergence_rl.regulariser import RehearsalDivergenceMetric

    return [
        Component("pass_at_k", PassAtKMetric, help="Pass@1 / Pass@k on held-out problems, in and out of domain"),
        Component("rehearsal_divergence", RehearsalDivergenceMetric,
                  help="f-divergences to the initial policy on the stored rehearsal responses"),
    ]


@hookimpl
def klcore_register_recipes() -> list[Component]:
    from divergence_rl import recipes
    from klcore.recipes import Recipe

    presample = Recipe(
        name="dph-presample",
        help="DPH-RL pre-sampling: k responses per prompt (toy task or data.*) from the base policy, scored, stored",
        config_class=recipes.PresampleRecipeConfig,
        run=recipes.run_presample,
    )
    toy = Recipe(
        name="dph-toy",
        help="experiment: base vs GRPO vs DPH forward-KL / JS at eta x {1, 10}, 3 seeds, Pass@k with 95% intervals",
        config_class=recipes.DPHToyConfig,
        run=recipes.run_toy,
    )
    return [Component(r.name, r, help=r.help) for r in (presample, toy)]
