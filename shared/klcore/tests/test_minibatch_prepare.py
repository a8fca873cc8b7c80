"""Policy losses with a ``prepare`` attribute: one call per optimiser mini-batch, rows sliced per micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klcore import Component, hookimpl
from klcore.errors import PluginError
from klcore.losses import check_policy_inputs
from klcore.plugins import build_plugin_manager
from klcore.reduce import aggregate
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer


class _StartsEven(AdditionTask):
    """Rewarded when the completion's first character has an even code point: groups have signal."""

    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def _centred_loss(old_log_prob, log_prob, advantages, mask, *, agg, counts, norm_length, centre=None):
    """-(A - c) * ratio with c the mean old log-prob over valid tokens (a baseline): of the mini-batch when
    prepared, else of this micro-batch (which makes the gradient depend on the split)."""
    m = check_policy_inputs(old_log_prob, log_prob, advantages, mask)
    if centre is None:
        centre = (old_log_prob * m).sum() / m.sum()
    else:
        centre = centre[:, :1]  # [rows, 1]: the same value in every row
    ratio = torch.exp(torch.where(m, log_prob - old_log_prob, torch.zeros(())))
    per_token = -(advantages - centre) * ratio
    return aggregate(per_token, m, agg, counts=counts, norm_length=norm_length), {"test/centre": centre.mean()}


def _loss(prepared: bool, calls: list, rows_override: int | None = None):
    """The centred loss; with ``prepared`` it carries a ``prepare`` that records its inputs in ``calls``."""

    def loss(*args, **kw):
        return _centred_loss(*args, **kw)

    def prepare(old_log_prob, log_prob, advantages, mask, *, accelerator):
        calls.append({"old": old_log_prob.clone(), "new": log_prob.clone(), "mask": mask.clone()})
        m = mask.float()
        centre = ((old_log_prob * m).sum() / m.sum()).expand(mask.shape[0], 1).clone()
        return {"centre": centre if rows_override is None else centre[:rows_override]}

    if prepared:
        loss.prepare = prepare  # type: ignore[attr-defined]
    return loss


class _LossPlugin:
    def __init__(self, fn) -> None:
        self.fn = fn

    @hookimpl
    def klcore_register_losses(self):
        return [Component("centred", self.fn)]


def _run(tmp: Path, fn, **kw) -> tuple[GRPOTrainer, list[dict]]:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    cfg = GRPOConfig(
        steps=1, lr=1e-3, prompts_per_step=4, group_size=4, eval_problems=8, progress=False, loss="centred",
        **kw,
    )
    plugins = build_plugin_manager(plugins=[("centred", _LossPlugin(fn))], load_entrypoints=False)
    trainer = GRPOTrainer(
        model, char_tokenizer(), _StartsEven(digits=1), cfg, run_dir=tmp, plugins=plugins,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
    )
    return trainer, trainer.train()


def _params(trainer: GRPOTrainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])


def test_prepare_runs_once_per_mini_batch_with_current_log_probs(tmp_path: Path) -> None:
    calls: list = []
    _trainer, _ = _run(tmp_path, _loss(True, calls), mini_batches=2, ppo_epochs=2, micro_batch_size=3)
    assert len(calls) == 4  # ppo_epochs x mini_batches optimiser steps
    first = calls[0]
    assert first["mask"].shape[0] == 8  # 16 rows in 2 mini-batches
    torch.testing.assert_close(first["new"], first["old"])  # on-policy on the first mini-batch
    # a later mini-batch sees the updated policy: its log-probs moved away from the old ones
    assert not torch.allclose(calls[-1]["new"] * calls[-1]["mask"], calls[-1]["old"] * calls[-1]["mask"])


def test_prepared_values_make_the_update_independent_of_the_micro_batch_split(tmp_path: Path) -> None:
    def final_params(prepared: bool, micro: int) -> torch.Tensor:
        trainer, _ = _run(tmp_path / f"{prepared}-{micro}", _loss(prepared, []), micro_batch_size=micro)
        return _params(trainer)

    whole = final_params(True, 0)
    torch.testing.assert_close(final_params(True, 4), whole, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(final_params(True, 3), whole, rtol=1e-4, atol=1e-6)  # uneven split
    # control: centring per micro-batch changes the update (so the test above can fail)
    torch.testing.assert_close(final_params(False, 0), whole, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(final_params(False, 3), whole, rtol=1e-4, atol=1e-6)


def test_micro_batches_receive_their_rows(tmp_path: Path) -> None:
    seen: list[torch.Tensor] = []

    def loss(old_log_prob, log_prob, advantages, mask, *, agg, counts, norm_length, row):
        seen.append(row.clone())
        return aggregate(-advantages * log_prob, mask, agg, counts=counts), {}

    def prepare(old_log_prob, log_prob, advantages, mask, *, accelerator):
        return {"row": torch.arange(mask.shape[0]).unsqueeze(1).float()}

    loss.prepare = prepare  # type: ignore[attr-defined]
    _run(tmp_path, loss, micro_batch_size=5)
    seen_rows = [r.flatten().tolist() for r in seen]
    assert seen_rows == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15]]


def test_prepare_must_return_one_row_per_mini_batch_row(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="one row per mini-batch row"):
        _run(tmp_path, _loss(True, [], rows_override=3), micro_batch_size=4)
