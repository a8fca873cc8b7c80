"""HyPO inside TRL's ``DPOTrainer`` (``pip install "hypo[trl]"``).

``HyPODPOTrainer`` keeps TRL's DPO loss (every ``loss_type``, its metrics, data pipeline, PEFT and
reference handling) and adds λ x HyPO's leave-one-out (RLOO) surrogate of the sequence reverse
KL(π_θ ‖ π_ref) on ``group_size`` completions sampled from the current policy for each prompt of the
micro-batch, through TRL's generation path::

    from hypo.integrations.trl import HyPODPOTrainer
    trainer = HyPODPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., processing_class=tokenizer,
                             kl_coef=0.1, group_size=4, max_new_tokens=128)

``kl_coef = 0`` is TRL's ``DPOTrainer`` exactly (nothing is sampled). trl is imported when
``HyPODPOTrainer`` is first accessed.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "HyPODPOTrainer":
        from hypo.integrations._trl_dpo import HyPODPOTrainer

        return HyPODPOTrainer
    raise AttributeError(f"module 'hypo.integrations.trl' has no attribute {name!r}")


__all__ = ["HyPODPOTrainer"]  # noqa: F822  (resolved lazily by __getattr__)
