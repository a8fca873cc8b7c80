"""HyPOConfig validation and the registered objectives' guard against the RL policy-loss call."""

from __future__ import annotations

import math

import pytest
import torch
from hypo import HyPOConfig, dpo_loss

from klcore.errors import ConfigError
from klcore.reduce import GlobalCounts


@pytest.mark.parametrize("loss", ["vanilla", "dpo-kto", "sigmoid"])
def test_config_rejects_a_loss_that_is_not_a_hypo_objective(loss: str) -> None:
    with pytest.raises(ConfigError, match="preference objectives"):
        HyPOConfig(loss=loss)


@pytest.mark.parametrize(
    ("loss", "eps"), [("dpo-hinge", 0.1), ("dpo-ipo", 0.2), ("dpo-robust", 0.5), ("dpo-sigmoid", 0.6), ("dpo-sigmoid", -0.1)]
)
def test_config_rejects_label_smoothing_invalid_for_the_loss(loss: str, eps: float) -> None:
    with pytest.raises(ConfigError, match="label_smoothing"):
        HyPOConfig(loss=loss, label_smoothing=eps)


def test_config_accepts_every_objective_with_valid_options() -> None:
    for loss in ("dpo-sigmoid", "dpo-hinge", "dpo-ipo", "dpo-robust"):
        assert HyPOConfig(loss=loss).loss == loss
    assert HyPOConfig(loss="dpo-robust", label_smoothing=0.2).label_smoothing == 0.2


def test_config_rejects_loss_options() -> None:
    with pytest.raises(ConfigError, match="loss_options"):
        HyPOConfig(loss_options={"kind": "hinge"})


@pytest.mark.parametrize("beta", [math.inf, math.nan, -1.0, 0.0])
def test_config_and_loss_reject_non_finite_or_non_positive_beta(beta: float) -> None:
    with pytest.raises(ConfigError, match="beta"):
        HyPOConfig(beta=beta)
    x = torch.zeros(3)
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(x, x + 1, x, x, beta=beta)


@pytest.mark.parametrize("kl_coef", [math.inf, math.nan])
def test_config_rejects_non_finite_kl_coef(kl_coef: float) -> None:
    with pytest.raises(ConfigError, match="kl_coef"):
        HyPOConfig(kl_coef=kl_coef)


@pytest.mark.parametrize("name", ["dpo-sigmoid", "dpo-hinge", "dpo-ipo", "dpo-robust"])
def test_registered_objective_refuses_the_policy_loss_call(plugins, name: str) -> None:  # type: ignore[no-untyped-def]
    objective = plugins.registry("loss").get_component(name)
    t = torch.zeros(2, 3)
    counts = GlobalCounts(tokens=6, sequences=2, world_size=1)
    # the call GRPOTrainer.compute_loss makes: (old_log_prob, log_prob, advantages, mask, *, agg, counts, norm_length)
    with pytest.raises(ConfigError, match=r"preference objective.*HyPOTrainer"):
        objective(t, t, torch.zeros(2), t.bool(), agg="token-mean", counts=counts, norm_length=3)


def test_registered_objective_computes_the_dpo_loss(plugins) -> None:  # type: ignore[no-untyped-def]
    x = torch.zeros(4)
    losses, _ = plugins.registry("loss").get_component("dpo-sigmoid")(x, x, x, x, beta=0.1)
    assert losses.shape == (4,)
    assert torch.allclose(losses, torch.full((4,), math.log(2.0)))  # -log sigma(0)
    hinge, _ = plugins.registry("loss").get_component("dpo-hinge")(x, x, x, x, beta=0.1)
    assert torch.allclose(hinge, torch.ones(4))  # max(0, 1 - 0)
