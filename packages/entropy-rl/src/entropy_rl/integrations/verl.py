"""Clip-Cov / KL-Cov in verl: importing this module registers ``clip_cov_klcore`` and ``kl_cov_klcore``
into verl's policy-loss registry (``@register_policy_loss``) when verl is installed.

verl already ships ``clip_cov`` and ``kl_cov`` (the reference implementation), so these names select
entropy_rl's instead: ``actor_rollout_ref.actor.policy_loss.loss_mode=kl_cov_klcore``. entropy-rl declares a
``verl.plugins`` entry point, so ``import verl`` in every Ray worker imports this module (no
``VERL_USE_EXTERNAL_MODULES`` needed). Options come from verl's config: ``policy_loss.clip_cov_ratio``,
``clip_cov_lb``, ``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef`` and ``clip_ratio_low`` / ``clip_ratio_high``
(verl's defaults where unset, e.g. ``ppo_kl_coef`` 0.1). verl calls the loss once per micro-batch on one
process, so the selection's scope is ``micro-batch``; the aggregate uses ``config.global_batch_info``
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``) as verl's own losses do, in
every ``loss_agg_mode``, and ``rollout_is_weights`` multiply the per-token loss as in verl. Without verl the
import registers nothing and ``REGISTERED`` is empty; with verl present but unusable (a dependency such as
ray missing) it raises ``klcore.errors.PluginError`` naming what is missing.
"""

from __future__ import annotations

import importlib.util

from klcore.errors import PluginError

NAMES: tuple[str, ...] = ("clip_cov_klcore", "kl_cov_klcore")

if importlib.util.find_spec("verl") is not None:
    try:
        from entropy_rl.integrations import _verl_losses  # noqa: F401  (registers on import)
    except ImportError as err:
        raise PluginError(
            f"verl is installed but cannot be imported ({type(err).__name__}: {err}); install verl's own dependencies "
            "(`pip install 'entropy-rl[verl]'` in a fresh environment) or uninstall verl"
        ) from err

    REGISTERED: tuple[str, ...] = NAMES
else:
    REGISTERED = ()

__all__ = ["NAMES", "REGISTERED"]
