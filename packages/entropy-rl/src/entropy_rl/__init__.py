"""entropy-rl: Clip-Cov, KL-Cov, an entropy-dynamics probe and the entropy-performance law.

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models".
"""

from __future__ import annotations

from entropy_rl.covariance import response_covariance, token_covariance
from entropy_rl.diagnostics import (
    TABLE1_FRACTIONS,
    covariance_entropy_agreement,
    sequence_mean_entropy,
    top_covariance_means,
    top_positive_share,
)
from entropy_rl.dynamics import EntropyDynamics, entropy_change_first_order
from entropy_rl.law import (
    MIN_R2,
    EntropyLawExtrapolation,
    EntropyLawFit,
    extrapolate_entropy_law,
    fit_entropy_law,
    fit_entropy_law_joint,
)
from entropy_rl.losses import SCOPES, clip_cov_loss, clip_cov_selection, kl_cov_loss, kl_cov_selection

__version__ = "0.1.0"

__all__ = [
    "MIN_R2",
    "SCOPES",
    "TABLE1_FRACTIONS",
    "EntropyDynamics",
    "EntropyLawExtrapolation",
    "EntropyLawFit",
    "extrapolate_entropy_law",
    "fit_entropy_law",
    "fit_entropy_law_joint",
    "__version__",
    "clip_cov_loss",
    "clip_cov_selection",
    "covariance_entropy_agreement",
    "entropy_change_first_order",
    "kl_cov_loss",
    "kl_cov_selection",
    "response_covariance",
    "sequence_mean_entropy",
    "token_covariance",
    "top_covariance_means",
    "top_positive_share",
]
