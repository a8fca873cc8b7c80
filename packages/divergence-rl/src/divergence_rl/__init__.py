"""divergence-rl: DPH-RL, mass-covering f-divergence rehearsal against the initial policy.

The rehearsal term is ``eta * token-mean f(exp(log pi_theta - stored log pi_ref))`` on responses
pre-sampled from the initial policy, so no reference model is loaded during RL.
"""

from divergence_rl.evaluation import PassAtKMetric, check_ks, correct_counts, mean_pass_at_k, pass_at_ks
from divergence_rl.generators import KINDS, LOG_RATIO_BOUND, check_alpha, check_kind, f_values
from divergence_rl.losses import (
    WEIGHTINGS,
    check_eta,
    check_mask,
    check_weighting,
    hybrid_loss,
    rehearsal_loss,
    rehearsal_share,
    verl_rehearsal_flags,
)
from divergence_rl.presampling import (
    PresampleConfig,
    model_fingerprint,
    presample,
    reference_parameters,
    training_prompts,
)
from divergence_rl.regulariser import DPHRegulariser, ExplorationTask, RehearsalDivergenceMetric, check_compatible
from divergence_rl.store import (
    FORMAT,
    MANIFEST,
    VERSION,
    RehearsalSet,
    SelectionRule,
    load_rehearsal,
    read_manifest,
    read_shard,
)

__all__ = [
    "FORMAT",
    "KINDS",
    "LOG_RATIO_BOUND",
    "MANIFEST",
    "VERSION",
    "WEIGHTINGS",
    "DPHRegulariser",
    "ExplorationTask",
    "PassAtKMetric",
    "PresampleConfig",
    "RehearsalDivergenceMetric",
    "RehearsalSet",
    "SelectionRule",
    "check_alpha",
    "check_compatible",
    "check_eta",
    "check_kind",
    "check_ks",
    "check_mask",
    "check_weighting",
    "correct_counts",
    "f_values",
    "hybrid_loss",
    "load_rehearsal",
    "mean_pass_at_k",
    "model_fingerprint",
    "pass_at_ks",
    "presample",
    "read_manifest",
    "read_shard",
    "reference_parameters",
    "rehearsal_loss",
    "rehearsal_share",
    "training_prompts",
    "verl_rehearsal_flags",
]
