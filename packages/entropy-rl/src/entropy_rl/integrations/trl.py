"""Clip-Cov / KL-Cov inside TRL's ``GRPOTrainer`` (``pip install "entropy-rl[trl]"``).

``CovGRPOTrainer`` replaces TRL's policy loss by :func:`entropy_rl.clip_cov_loss` or
:func:`entropy_rl.kl_cov_loss` and keeps the rest of TRL (generation, rewards, advantages, logging)::

    from entropy_rl.integrations.trl import CovGRPOTrainer
    trainer = CovGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.0, ...), train_dataset=...,
                             cov_loss="kl_cov", cov_options={"ratio": 2e-3, "beta": 1.0})

The loss is the token mean over each micro-batch divided by the gradient-accumulation steps (TRL's
``bnpo`` normalisation). With ``scope="global"`` (default) the covariance, ``N`` and the selection
span the concurrent micro-batches of every process; TRL computes the loss one micro-batch at a time,
so the selection does not span gradient-accumulation steps. KL-Cov needs several updates per
generation (``steps_per_generation`` or ``num_iterations`` > 1): its penalty is inactive on policy.
TRL's reference KL (``beta``) is not supported (the paper trains without it). trl is imported when
``CovGRPOTrainer`` is first accessed.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "CovGRPOTrainer":
        from entropy_rl.integrations._trl_trainer import CovGRPOTrainer

        return CovGRPOTrainer
    raise AttributeError(f"module 'entropy_rl.integrations.trl' has no attribute {name!r}")


__all__ = ["CovGRPOTrainer"]  # noqa: F822  (resolved lazily by __getattr__)
