"""opd-distill: on-policy distillation with reverse KL (VLA-OPD) and PACED pass-rate weighting, on klcore."""

from __future__ import annotations

from opd_distill.config import DistillConfig, EnvDistillConfig
from opd_distill.env import Box, Discrete, Env, PickBlockEnv
from opd_distill.env_trainer import EnvDistillTrainer
from opd_distill.objectives import (
    DIVERGENCES,
    OBJECTIVES,
    check_vocab,
    divergence_loss,
    hard_ce_loss,
    opd_ppo_loss,
    opd_reinforce_loss,
    opd_reward,
)
from opd_distill.paced import (
    WEIGHTINGS,
    PacedConfig,
    estimate_pass_rates,
    hard_filter_weight,
    normalize_weights,
    paced_weight,
)
from opd_distill.policies import (
    ActionTokenPolicy,
    Episodes,
    ScriptedTeacher,
    behaviour_cloning,
    rollout,
    success_rate,
    successful,
)
from opd_distill.trainer import DistillTrainer, output_vocab, response_logits

__all__ = [
    "ActionTokenPolicy",
    "Box",
    "DIVERGENCES",
    "Discrete",
    "DistillConfig",
    "DistillTrainer",
    "Env",
    "EnvDistillConfig",
    "EnvDistillTrainer",
    "Episodes",
    "OBJECTIVES",
    "PacedConfig",
    "PickBlockEnv",
    "ScriptedTeacher",
    "WEIGHTINGS",
    "behaviour_cloning",
    "check_vocab",
    "divergence_loss",
    "estimate_pass_rates",
    "hard_ce_loss",
    "hard_filter_weight",
    "normalize_weights",
    "opd_ppo_loss",
    "opd_reinforce_loss",
    "opd_reward",
    "output_vocab",
    "paced_weight",
    "response_logits",
    "rollout",
    "success_rate",
    "successful",
]
