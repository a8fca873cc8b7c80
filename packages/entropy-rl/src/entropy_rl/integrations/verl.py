"""Clip-Cov / KL-Cov in verl: importing this module registers ``clip_cov_klcore`` and ``kl_cov_klcore``
into verl's policy-loss registry (``@register_policy_loss``) when verl is installed.

verl already ships ``clip_cov`` and ``kl_cov`` (the reference implementation), so these names select
entropy_rl's instead: ``import entropy_rl.integrations.verl`` in the worker processes, then
``actor.policy_loss.loss_mode=kl_cov_klcore``. Options come from verl's config: ``policy_loss.clip_cov_ratio``,
``clip_cov_lb``, ``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef`` and ``clip_ratio_low`` / ``clip_ratio_high``
(verl's defaults where unset, e.g. ``ppo_kl_coef`` 0.1). verl calls the loss once per micro-batch on one
process, so the scope is ``micro-batch`` there. Without verl the import registers nothing and
``REGISTERED`` is empty.
"""

from __future__ import annotations

import importlib.util

NAMES: tuple[str, ...] = ("clip_cov_klcore", "kl_cov_klcore")

if importlib.util.find_spec("verl") is not None:
    from entropy_rl.integrations import _verl_losses  # noqa: F401  (registers on import)

    REGISTERED: tuple[str, ...] = NAMES
else:
    REGISTERED = ()

__all__ = ["NAMES", "REGISTERED"]
