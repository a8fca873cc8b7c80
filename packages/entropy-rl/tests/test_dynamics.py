"""Entropy dynamics: Lemma 1 / Theorems 1-2 by finite differences on a softmax, and the run-time probe."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from entropy_rl import EntropyDynamics, entropy_change_first_order, response_covariance

from klcore.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer


def _entropy(z: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z.double(), -1)
    return -(p * torch.log(p)).sum(-1)


@pytest.mark.parametrize("form", ["vanilla", "natural"])
def test_first_order_change_matches_finite_differences(form: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(5, 7, generator=g, dtype=torch.float64)
    pi = torch.softmax(z, -1)
    direction = pi * adv if form == "vanilla" else adv  # Theorem 1 (PG) or Theorem 2 (NPG)
    for eta in (1e-3, 1e-4):
        fd = _entropy(z + eta * direction) - _entropy(z)
        predicted = eta * entropy_change_first_order(z, direction).double()
        # first order: the error is O(eta^2), far below the change itself
        assert torch.all((fd - predicted).abs() < 50 * eta**2 + 1e-7), (fd, predicted)
        assert torch.all((fd - predicted).abs() < 0.05 * fd.abs() + 1e-7)
    # the covariance written out for one state (independent of the implementation)
    p, lp, d = pi[0], torch.log(pi[0]), direction[0]
    cov = (p * lp * d).sum() - (p * lp).sum() * (p * d).sum()
    assert float(entropy_change_first_order(z[:1], direction[:1])[0]) == pytest.approx(-float(cov), rel=1e-5)


def test_signs_of_the_paper() -> None:
    z = torch.tensor([[3.0, 0.0, -1.0]])
    # NPG with A aligned with log pi (Cov > 0): entropy falls
    assert float(entropy_change_first_order(z, torch.tensor([[1.0, 0.0, -1.0]]))) < 0
    # a rare action with a large advantage: entropy rises
    assert float(entropy_change_first_order(z, torch.tensor([[0.0, 0.0, 5.0]]))) > 0
    # a constant shift of the logits changes nothing
    assert float(entropy_change_first_order(z, torch.full((1, 3), 2.0))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ShapeError):
        entropy_change_first_order(z, torch.zeros(1, 2))


def test_first_order_change_rejects_non_finite_input() -> None:
    z = torch.tensor([[3.0, 0.0, -1.0], [1.0, 2.0, 0.5]])
    d = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.0, 0.0]])
    for bad in (float("nan"), float("inf")):
        zb = z.clone()
        zb[1, 1] = bad
        with pytest.raises(NonFiniteError, match="logits"):
            entropy_change_first_order(zb, d)
        db = d.clone()
        db[0, 2] = bad
        with pytest.raises(NonFiniteError, match="delta_logits"):
            entropy_change_first_order(z, db)
    with pytest.raises(NonFiniteError, match="every logit"):
        entropy_change_first_order(torch.full((1, 3), float("-inf")), torch.zeros(1, 3))
    with pytest.raises(DTypeError):
        entropy_change_first_order(z.long(), d)
    # -inf logits are actions of probability 0: allowed, and their delta does not count (even if NaN)
    zm, dm = z.clone(), d.clone()
    zm[0, 2], dm[0, 2] = float("-inf"), float("nan")
    got = entropy_change_first_order(zm, dm)
    want = entropy_change_first_order(z[:1, :2], d[:1, :2])
    assert torch.isfinite(got).all() and float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)


def test_response_covariance_by_hand() -> None:
    lp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0], [-1.0, -1.0], [-4.0, -2.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    adv = torch.tensor([[1.0], [-1.0], [2.0], [0.0]]).expand(4, 2).clone()
    got = response_covariance(lp, adv, mask, group_size=2)
    # group 1: l = (-2, -2) -> 0; group 2: l = (-1, -3), A = (2, 0): ((1)(1) + (-1)(-1)) / 2 = 1
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0]))


class _StartsEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def test_probe_logs_predicted_and_measured_change(tmp_path: Path, plugins) -> None:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    with torch.no_grad():  # a less uniform policy: at uniform, entropy is at its maximum and first order vanishes
        model.lm_head.weight.mul_(6.0)
    cfg = GRPOConfig(
        steps=3, lr=1e-3, prompts_per_step=4, group_size=4, progress=False, micro_batch_size=6,
        metrics={"entropy_dynamics": {"max_states": 20}},
    )
    trainer = GRPOTrainer(
        model, char_tokenizer(), _StartsEven(digits=1), cfg, run_dir=tmp_path, plugins=plugins,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.002),
    )
    with pytest.warns(UserWarning, match="below one token"):
        history = trainer.train()
    for row in history:
        # the probe's before-entropy is the trainer's (same policy, same states)
        assert row["dynamics/entropy"] == pytest.approx(row["entropy/mean"], rel=1e-4)
        assert row["dynamics/actual_change"] != 0
        # small SGD steps: the first-order prediction tracks the measured change
        assert abs(row["dynamics/actual_change"]) > 1e-4
        assert row["dynamics/predicted_change"] == pytest.approx(row["dynamics/actual_change"], rel=0.1)
        for key in ("dynamics/cov_token", "dynamics/cov_response", "dynamics/entropy_after"):
            assert key in row
        assert 0 <= row["dynamics/entropy_seq_mean"] <= math.log(model.config.vocab_size)
        assert row["dynamics/cov_top_0.0002"] >= row["dynamics/cov_top_0.002"] >= row["dynamics/cov_top_0.02"]
        assert row["dynamics/cov_top_0.02"] >= row["dynamics/cov_token"]  # the top tokens against all tokens
        assert 0 <= row["cov/top_frac"] <= 1
        # default ratio 2e-3 x ~50 tokens per mini-batch: below one token, flagged
        assert row["cov/warn_ratio_select_none"] == 1.0
    # run statistics recomputed from the logged per-step values (numpy, not the probe's helper)
    cov = np.array([r["dynamics/cov_response"] for r in history])
    dh = np.array([r["dynamics/entropy_seq_mean_after"] - r["dynamics/entropy_seq_mean"] for r in history])
    assert history[-1]["dynamics/run_cov_positive_frac"] == pytest.approx(float(np.mean(cov > 0)))
    assert history[-1]["dynamics/run_corr_cov_neg_dh"] == pytest.approx(float(np.corrcoef(cov, -dh)[0, 1]), abs=1e-9)
    # the next step's entropy before its update is this step's entropy after (on other states): same scale
    assert abs(history[1]["dynamics/entropy"] - history[0]["dynamics/entropy_after"]) < 0.5


def test_probe_options() -> None:
    with pytest.raises(ConfigError, match="max_states"):
        EntropyDynamics(max_states=0)
    with pytest.raises(ConfigError, match="seed"):
        EntropyDynamics(seed="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ratio"):
        EntropyDynamics(ratio=1.5)
    with pytest.raises(ConfigError, match="cov_bounds"):
        EntropyDynamics(cov_bounds=(5.0, 1.0))
