"""The DPH-RL terms: per-row routing of mixed batches, the regulariser inside GRPOTrainer (stored
log-probs only, micro-batch invariance), and bad inputs."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from divergence_rl import (
    ExplorationTask,
    PresampleConfig,
    f_values,
    hybrid_loss,
    plugin,
    presample,
    rehearsal_loss,
    verl_rehearsal_flags,
)

from klcore.errors import (
    ConfigError,
    DataError,
    DTypeError,
    MaskError,
    NonFiniteError,
    ShapeError,
    VocabMismatchError,
)
from klcore.losses import ppo_clip_loss
from klcore.plugins import build_plugin_manager
from klcore.reduce import global_counts
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer


class FirstCharEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


TASK = FirstCharEven(digits=1)


def _mixed_batch(rows: int = 6, length: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, length, generator=g) < 0.8
    mask[:, 0] = True
    return {
        "old": -torch.rand(rows, length, generator=g) * 2,
        "new": (-torch.rand(rows, length, generator=g) * 2).requires_grad_(True),
        "adv": torch.randn(rows, 1, generator=g).expand(rows, length).contiguous(),
        "ref": -torch.rand(rows, length, generator=g) * 2,
        "mask": mask,
    }


def _manual_f_mean(new, ref, mask, kind) -> torch.Tensor:
    values = [f_values(new[i, j] - ref[i, j], kind) for i in range(new.shape[0]) for j in range(new.shape[1])
              if mask[i, j]]
    return torch.stack(values).sum() / len(values)


@pytest.mark.parametrize("kind", ["js", "forward_kl", "alpha"])
def test_mixed_batch_routes_every_row_by_its_own_flag(kind: str) -> None:
    b = _mixed_batch()
    flags = torch.tensor([True, False, True, False, False, True])  # the first row is a rehearsal row
    loss, metrics = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags, kind=kind, eta=0.3)
    online, rehearsal = (~flags).nonzero().flatten(), flags.nonzero().flatten()
    want_policy, _ = ppo_clip_loss(b["old"][online], b["new"][online], b["adv"][online], b["mask"][online])
    want = want_policy + 0.3 * _manual_f_mean(b["new"][rehearsal], b["ref"][rehearsal], b["mask"][rehearsal], kind)
    torch.testing.assert_close(loss, want)
    assert float(metrics["dph/rehearsal_rows"]) == pytest.approx(0.5)
    # the reference code's rule (the whole micro-batch follows its first row) gives another loss
    first_row_rule = 0.3 * _manual_f_mean(b["new"], b["ref"], b["mask"], kind)
    assert abs(float(loss.detach()) - float(first_row_rule.detach())) > 1e-3
    # a rehearsal row's advantages and an online row's stored log-probs do not matter
    b2 = {k: v.detach().clone() for k, v in b.items()}
    b2["adv"][rehearsal] += 5.0
    b2["old"][rehearsal] -= 1.0
    b2["ref"][online] += 3.0
    again, _ = hybrid_loss(b2["old"], b["new"], b2["adv"], b2["ref"], b["mask"], flags, kind=kind, eta=0.3)
    torch.testing.assert_close(again, loss)


def test_mixed_micro_batches_with_global_counts_sum_to_the_whole() -> None:
    b = _mixed_batch(rows=8, seed=1)
    flags = torch.tensor([False, False, False, True, True, False, True, False])
    whole, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags)
    (g_whole,) = torch.autograd.grad(whole, b["new"])
    m = b["mask"]
    counts = (global_counts(m & ~flags[:, None]), global_counts(m & flags[:, None]))
    total = torch.zeros(())
    for part in (slice(0, 3), slice(3, 5), slice(5, 8)):  # online only, rehearsal only, mixed
        share, _ = hybrid_loss(b["old"][part], b["new"][part], b["adv"][part], b["ref"][part], m[part], flags[part],
                               counts=counts)
        total = total + share
    (g_split,) = torch.autograd.grad(total, b["new"])
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(g_split, g_whole)


def test_rehearsal_loss_value_gradient_and_padding() -> None:
    b = _mixed_batch(seed=2)
    ref = torch.where(b["mask"], b["ref"], torch.full_like(b["ref"], float("nan")))  # padding may hold anything
    loss, metrics = rehearsal_loss(b["new"], ref, b["mask"], kind="forward_kl", eta=0.5)
    torch.testing.assert_close(loss, 0.5 * _manual_f_mean(b["new"], b["ref"], b["mask"], "forward_kl"))
    (grad,) = torch.autograd.grad(loss, b["new"])
    # d/dlogp (u - 1 - log u) = u - 1, averaged over the valid tokens
    u = torch.exp(b["new"].detach() - b["ref"])
    want = torch.where(b["mask"], 0.5 * (u - 1) / b["mask"].sum(), torch.zeros_like(u))
    torch.testing.assert_close(grad, want)
    assert float(metrics["dph/divergence"]) == pytest.approx(float(loss.detach()) / 0.5)


def test_bad_inputs_to_the_losses() -> None:
    b = _mixed_batch()
    with pytest.raises(ShapeError):
        rehearsal_loss(b["new"], b["ref"][:, :3], b["mask"])
    with pytest.raises(ShapeError):
        hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], torch.ones(5, dtype=torch.bool))
    with pytest.raises(MaskError):
        hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], torch.zeros_like(b["mask"]), torch.ones(6, dtype=torch.bool))
    with pytest.raises(ConfigError):
        rehearsal_loss(b["new"], b["ref"], b["mask"], kind="alpha", alpha=1.0)


@pytest.mark.parametrize("eta", [-1.0, float("nan"), float("inf"), True, "0.2"])
def test_eta_must_be_a_finite_number_at_least_zero(eta) -> None:
    b = _mixed_batch()
    with pytest.raises(ConfigError, match="eta"):
        rehearsal_loss(b["new"], b["ref"], b["mask"], eta=eta)
    with pytest.raises(ConfigError, match="eta"):
        hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], torch.ones(6, dtype=torch.bool), eta=eta)


@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_a_non_finite_stored_log_prob_at_a_valid_token_is_refused(bad: float) -> None:
    b = _mixed_batch()
    ref = b["ref"].clone()
    ref[2, 0] = bad  # column 0 is valid in every row
    with pytest.raises(NonFiniteError, match=r"ref_log_prob .* \(2, 0\)"):
        rehearsal_loss(b["new"], ref, b["mask"], kind="forward_kl")
    new = b["new"].detach().clone()
    new[1, 0] = bad
    with pytest.raises(NonFiniteError, match="log_prob"):
        rehearsal_loss(new, b["ref"], b["mask"])


def test_padding_may_hold_anything_in_both_log_probs() -> None:
    b = _mixed_batch(seed=4)
    pad = ~b["mask"]
    assert pad.any()
    clean, _ = rehearsal_loss(b["new"], b["ref"], b["mask"], kind="js")
    (g_clean,) = torch.autograd.grad(clean, b["new"])
    for junk in (float("nan"), float("-inf"), float("inf"), 1e30):
        new = torch.where(pad, torch.full_like(b["new"], junk), b["new"].detach()).requires_grad_(True)
        ref = torch.where(pad, torch.full_like(b["ref"], junk), b["ref"])
        loss, _ = rehearsal_loss(new, ref, b["mask"], kind="js")
        (grad,) = torch.autograd.grad(loss, new)
        torch.testing.assert_close(loss, clean)
        torch.testing.assert_close(grad, g_clean)
        assert bool((grad[pad] == 0).all())


def test_masks_boolean_zero_one_or_none() -> None:
    b = _mixed_batch()
    want, _ = rehearsal_loss(b["new"], b["ref"], b["mask"], kind="alpha")
    as_float, _ = rehearsal_loss(b["new"], b["ref"], b["mask"].float(), kind="alpha")
    torch.testing.assert_close(as_float, want)
    every, _ = rehearsal_loss(b["new"], b["ref"], None, kind="alpha", eta=1.0)
    torch.testing.assert_close(every, _manual_f_mean(b["new"], b["ref"], torch.ones_like(b["mask"]), "alpha"))
    soft = b["mask"].float()
    soft[0, 0] = 0.5
    with pytest.raises(MaskError, match=r"0\.5"):
        rehearsal_loss(b["new"], b["ref"], soft)
    with pytest.raises(MaskError, match="0 and 1"):
        hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], soft, torch.ones(6, dtype=torch.bool))
    flags = torch.tensor([True, False, True, False, False, True])
    mixed_none, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], None, flags)
    mixed_ones, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], torch.ones_like(b["mask"]), flags)
    torch.testing.assert_close(mixed_none, mixed_ones)


def test_verl_row_types_are_refused_raw_and_accepted_through_the_helper() -> None:
    b = _mixed_batch()
    types = torch.tensor([2, 1, 2, 1, 1, 2])  # verl: 1 online, 2 stored rehearsal row
    with pytest.raises(DTypeError, match="verl_rehearsal_flags"):
        hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], types)
    with pytest.raises(DTypeError, match="bool"):
        hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], (types == 2).long())
    flags = verl_rehearsal_flags(types)
    assert flags.tolist() == [True, False, True, False, False, True]
    got, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags, kind="js")
    want, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], types == 2, kind="js")
    torch.testing.assert_close(got, want)
    with pytest.raises(DataError, match=r"\[0\]"):
        verl_rehearsal_flags(torch.tensor([0, 1, 2]))
    with pytest.raises(DTypeError):
        verl_rehearsal_flags(torch.tensor([1.0, 2.0]))


def test_hybrid_loss_ignores_what_the_other_kind_of_row_and_padding_hold() -> None:
    b = _mixed_batch(seed=5)
    flags = torch.tensor([False, True, False, True, False, False])
    clean, _ = hybrid_loss(b["old"], b["new"], b["adv"], b["ref"], b["mask"], flags, kind="forward_kl")
    (g_clean,) = torch.autograd.grad(clean, b["new"])
    nan = torch.full_like(b["old"], float("nan"))
    rows = flags[:, None].expand_as(b["mask"])
    old = torch.where(rows, nan, b["old"])  # rehearsal rows: no old log-probs or advantages (verl stores zeros)
    adv = torch.where(rows, nan, b["adv"])
    ref = torch.where(rows, b["ref"], nan)  # online rows: no stored log-probs
    new = torch.where(b["mask"], b["new"].detach(), nan).requires_grad_(True)
    loss, _ = hybrid_loss(old, new, adv, ref, b["mask"], flags, kind="forward_kl")
    (grad,) = torch.autograd.grad(loss, new)
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(grad, g_clean)


# --- inside GRPOTrainer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    cfg = PresampleConfig(num_prompts=24, samples=4, extra_sample=False, min_correct=2, chunk_size=8, seed=1)
    summary = presample(model, char_tokenizer(), TASK, cfg, root)
    assert summary["rehearsal_prompts"] >= 4
    return root


def _fresh_plugins():
    """Each trainer registers its regulariser objects in its manager: one manager per trainer."""
    return build_plugin_manager(plugins=[("divergence_rl", plugin)], load_entrypoints=False)


def _trainer(run_dir: Path, plugins, store: Path, *, model=None, sgd: bool = False, **kw) -> GRPOTrainer:
    model = model if model is not None else tiny_causal_lm(tiny_config("tiny"), seed=0)
    reg = {"path": str(store), "kind": "js", "eta": 0.2, "batch_size": 6}
    reg.update(kw.pop("dph", {}))
    base = dict(steps=3, lr=1e-2, prompts_per_step=4, group_size=4, eval_problems=4, progress=False,
                regularisers={"dph": reg})
    base.update(kw)
    return GRPOTrainer(model, char_tokenizer(), TASK, GRPOConfig(**base), run_dir=run_dir, plugins=plugins,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.5) if sgd else None)


@contextlib.contextmanager
def _foreign_model_forwards(policy: torch.nn.Module):
    """Names of modules that ran a forward while holding a parameter the policy does not own: a second
    model (a reference copy) is caught; parameter-free wrappers other libraries create (transformers'
    `kernels` functions as modules) are not, since they hold no weights of any model."""
    owned = {id(p) for p in policy.parameters()}
    foreign: list[str] = []

    def record(module, args, output):
        if any(id(p) not in owned for p in module.parameters()):
            foreign.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield foreign
    finally:
        handle.remove()


def test_foreign_model_check_ignores_parameter_free_modules() -> None:
    policy, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wrapper = torch.nn.Sequential(policy, torch.nn.ReLU())  # holds only the policy's weights
    with _foreign_model_forwards(policy) as foreign:
        torch.nn.GELU()(wrapper(torch.ones(1, 2)))
    assert foreign == []
    with _foreign_model_forwards(policy) as foreign:
        other(torch.ones(1, 2))
    assert foreign == ["Linear"]


def test_regulariser_uses_stored_log_probs_only(store, plugins, tmp_path) -> None:
    trainer = _trainer(tmp_path, plugins, store, metrics={"rehearsal_divergence": {"path": str(store), "every": 1}})
    assert trainer.ref_model is None
    with _foreign_model_forwards(trainer.model) as foreign:
        rows = trainer.train()
    assert not foreign, f"modules holding weights outside the policy were called: {sorted(set(foreign))}"
    # step 0's term is taken before the first update, when the policy is still the initial one
    assert rows[0]["dph/loss"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["rehearsal/js"] > 0 and rows[-1]["dph/loss"] > 0
    assert rows[-1]["loss/total"] == pytest.approx(rows[-1]["loss/objective"] + rows[-1]["dph/loss"], rel=1e-5,
                                                   abs=1e-7)


def test_a_called_reference_model_would_be_caught(store, plugins, tmp_path) -> None:
    """The check above fails when a model other than the policy runs (here the core's online KL)."""
    trainer = _trainer(tmp_path, plugins, store, kl_coef=0.1)
    with _foreign_model_forwards(trainer.model) as foreign:
        trainer.train()
    assert foreign


def test_micro_batches_do_not_change_the_update(store, plugins, tmp_path) -> None:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    init = copy.deepcopy(model)
    # forward_kl_plain: f'(1) = -1, so the term has a gradient from the first step on
    whole = _trainer(tmp_path / "whole", plugins, store, model=model, sgd=True, steps=2, dph={"kind": "forward_kl_plain"})
    whole.train()
    split = _trainer(tmp_path / "split", _fresh_plugins(), store, model=init, sgd=True, steps=2, micro_batch_size=5,
                     dph={"kind": "forward_kl_plain"})
    split.train()
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(whole.unwrapped_model.parameters(),
                                                          tiny_causal_lm(tiny_config("tiny"), seed=0).parameters(),
                                                          strict=True))
    assert moved > 1e-4
    for a, b in zip(whole.unwrapped_model.parameters(), split.unwrapped_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vocab_and_temperature_mismatch(store, plugins, tmp_path) -> None:
    config = tiny_config("tiny")
    config.vocab_size += 5
    with pytest.raises(VocabMismatchError, match="vocabulary"):
        _trainer(tmp_path / "v", plugins, store, model=tiny_causal_lm(config)).train()
    with pytest.raises(ConfigError, match="temperature"):
        _trainer(tmp_path / "t", _fresh_plugins(), store, temperature=0.7).train()


@pytest.mark.parametrize("options", [{"kind": "kl"}, {"kind": "alpha", "alpha": 0.0}, {"eta": -1.0}, {"eta": float("nan")},
                                     {"batch_size": -2}, {"rule": {"min_correct": 9}}])
def test_bad_regulariser_options(store, plugins, tmp_path, options) -> None:
    with pytest.raises(ConfigError):
        _trainer(tmp_path, plugins, store, dph=options)


def test_missing_store_and_empty_exploration(plugins, tmp_path) -> None:
    with pytest.raises(ConfigError, match="no rehearsal store"):  # the DataError, named by Plugins.enable
        _trainer(tmp_path, plugins, tmp_path / "no-store")
    with pytest.raises(ConfigError, match="exploration"):
        ExplorationTask(TASK, ())


# --- the store's initial policy ------------------------------------------------------------------


def test_store_from_another_initial_policy_is_refused_at_step_0(store, tmp_path) -> None:
    other = tiny_causal_lm(tiny_config("tiny"), seed=1)  # same architecture and vocabulary, other weights
    with pytest.raises(DataError, match=r"another initial policy.*check_model = false"):
        _trainer(tmp_path / "reg", _fresh_plugins(), store, model=other).train()
    metric_only = {"regularisers": {}, "metrics": {"rehearsal_divergence": {"path": str(store)}}}
    with pytest.raises(DataError, match="another initial policy"):
        _trainer(tmp_path / "metric", _fresh_plugins(), store, model=copy.deepcopy(other), **metric_only).train()
    rows = _trainer(tmp_path / "override", _fresh_plugins(), store, model=other, steps=1,
                    dph={"check_model": False}).train()
    assert rows[0]["dph/loss"] > 0  # the other model is far from the store's log-probs


def test_a_resumed_run_is_not_checked_against_its_moved_weights(store, tmp_path) -> None:
    from divergence_rl import load_rehearsal, model_fingerprint

    _trainer(tmp_path, _fresh_plugins(), store, steps=2).train()
    resumed = _trainer(tmp_path, _fresh_plugins(), store, steps=3, resume=True)
    assert resumed.resume() and resumed.step == 2
    assert model_fingerprint(resumed.unwrapped_model) != load_rehearsal(store).manifest["model_fingerprint"]
    resumed = _trainer(tmp_path, _fresh_plugins(), store, steps=3, resume=True)
    assert len(resumed.train()) == 3


def test_a_lora_policy_over_the_stores_base_model_is_accepted(store, tmp_path) -> None:
    from divergence_rl import model_fingerprint

    from klcore.models import LoraConfig, add_lora

    base = tiny_causal_lm(tiny_config("tiny"), seed=0)
    plain = model_fingerprint(base)
    lora = add_lora(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert model_fingerprint(lora) == plain
    rows = _trainer(tmp_path, _fresh_plugins(), store, model=lora, steps=1).train()
    assert rows[0]["dph/loss"] == pytest.approx(0.0, abs=1e-6)  # LoRA's B = 0: the policy starts at the base


def test_check_model_must_be_a_flag(store, plugins, tmp_path) -> None:
    with pytest.raises(ConfigError, match="check_model"):
        _trainer(tmp_path, plugins, store, dph={"check_model": "no"})
