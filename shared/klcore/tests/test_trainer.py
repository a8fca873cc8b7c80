"""The GRPO trainer: metrics, exact resume, micro-batch invariance, plugin composition, KL penalty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from klcore import Component, hookimpl
from klcore.errors import ConfigError, UnknownNameError
from klcore.plugins import Registered, build_plugin_manager
from klcore.reduce import aggregate
from klcore.toy import AdditionTask, char_tokenizer, tiny_causal_lm, tiny_config
from klcore.trainer import GRPOConfig, GRPOTrainer, latest_checkpoint


def _config(**kw) -> GRPOConfig:
    base = dict(steps=3, lr=1e-3, prompts_per_step=4, group_size=4, eval_problems=8, progress=False)
    base.update(kw)
    return GRPOConfig(**base)


class _StartsEven(AdditionTask):
    """Addition prompts rewarded when the completion's first character has an even code point: about
    half of a random policy's samples score, so groups have signal."""

    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def _trainer(run_dir: Path, plugins=None, seed: int = 0, sgd: bool = False, **kw) -> GRPOTrainer:
    model = tiny_causal_lm(tiny_config("tiny"), seed=seed)
    return GRPOTrainer(
        model, char_tokenizer(), _StartsEven(digits=1), _config(**kw), run_dir=run_dir,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0) if sgd else None,
        eval_tasks={"addition": AdditionTask(digits=1)},
        plugins=plugins if plugins is not None else build_plugin_manager(load_entrypoints=False),
    )


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_run_writes_metrics_config_and_checkpoint(tmp_path: Path) -> None:
    history = _trainer(tmp_path, eval_every=2, steps=3).train()
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2] == [h["step"] for h in history]
    for key in ("reward/mean", "entropy/mean", "loss/objective", "policy/clipfrac", "optim/grad_norm", "reward/pass_at_4"):
        assert all(key in r for r in rows), key
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    assert "eval/addition_accuracy" not in rows[1] and "eval/addition_accuracy" in rows[2]
    # single PPO epoch, one mini-batch: the importance ratio is exactly one
    assert all(r["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) for r in rows)
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 3
    assert latest_checkpoint(tmp_path).name == "step-00000003"


class _Crash:
    @hookimpl
    def klcore_step_start(self, step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt("simulated interruption")


class _Counter:
    """Run-time plugin with state that must survive a resume."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def klcore_step_end(self, step: int) -> dict[str, float]:
        self.calls += 1
        return {"counter/calls": float(self.calls)}

    @hookimpl
    def klcore_save_checkpoint(self) -> dict[str, torch.Tensor]:
        return {"calls": torch.tensor(self.calls)}

    @hookimpl
    def klcore_load_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        self.calls = int(state["calls"])


def _with(*objs: tuple[str, object]):
    return build_plugin_manager(plugins=list(objs), load_entrypoints=False)


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    full = tmp_path / "full"
    a = _trainer(full, plugins=_with(("counter", _Counter())), steps=5, checkpoint_every=2, ppo_epochs=2, mini_batches=2)
    a.train()
    part = tmp_path / "part"
    b = _trainer(part, plugins=_with(("counter", _Counter()), ("crash", _Crash())), steps=5, checkpoint_every=2,
                 ppo_epochs=2, mini_batches=2)
    with pytest.raises(KeyboardInterrupt):
        b.train()
    assert latest_checkpoint(part).name == "step-00000002"
    assert len(_metrics(part)) == 3  # step 2 was logged, then the crash before its checkpoint
    c = _trainer(part, plugins=_with(("counter", _Counter())), seed=123, steps=5, checkpoint_every=2, ppo_epochs=2,
                 mini_batches=2, resume=True)  # seed=123: the initial weights are overwritten by the checkpoint
    history = c.train()
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert _metrics(part) == _metrics(full)
    for p, q in zip(a.unwrapped_model.parameters(), c.unwrapped_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    history = _trainer(tmp_path, steps=1, resume=True).train()
    assert [h["step"] for h in history] == [0]


def _one_step_params(run_dir: Path, **kw) -> list[torch.Tensor]:
    t = _trainer(run_dir, steps=1, **kw)
    t.train()
    return [p.detach().cpu().clone() for p in t.unwrapped_model.parameters()]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_do_not_change_the_update(tmp_path: Path, agg: str) -> None:
    # plain SGD with lr 1: the parameter change is minus the clipped gradient, linear in it
    whole = _one_step_params(tmp_path / "whole", agg=agg, sgd=True)
    split = _one_step_params(tmp_path / "split", agg=agg, sgd=True, micro_batch_size=3)
    init = [p.detach() for p in tiny_causal_lm(tiny_config("tiny"), seed=0).parameters()]
    moved = max(float((w - i).abs().max()) for w, i in zip(whole, init, strict=True))
    assert moved > 1e-4  # the step did something
    for w, s in zip(whole, split, strict=True):
        torch.testing.assert_close(w, s, rtol=1e-5, atol=1e-7)


class _Term:
    """A regulariser: weight x token-mean of log-probs, added once per micro-batch share."""

    def __init__(self, name: str, weight: float) -> None:
        self.name, self.weight = name, weight

    @hookimpl
    def klcore_extra_loss(self, batch, outputs, counts) -> dict[str, torch.Tensor]:
        term = aggregate(outputs["log_prob"], batch["response_mask"], "token-mean", counts=counts)
        return {f"{self.name}/term": self.weight * term}


class _Provider:
    def __init__(self, kind_name: str) -> None:
        self.kind_name = kind_name

    @hookimpl
    def klcore_register_regularisers(self) -> list[Component]:
        return [Component(self.kind_name, lambda weight=1.0: _Term(self.kind_name, weight))]


def test_regularisers_from_two_plugins_compose(tmp_path: Path) -> None:
    plugins = _with(("pa", _Provider("reg_a")), ("pb", _Provider("reg_b")))
    t = _trainer(tmp_path, plugins=plugins, steps=2, regularisers={"reg_a": {"weight": 0.5}, "reg_b": {"weight": -2.0}})
    for row in t.train():
        a, b = row["reg_a/term"], row["reg_b/term"]
        assert a < 0 and b > 0  # log-probs are negative: the weights' signs carry through
        assert a / b == pytest.approx(0.5 / -2.0, rel=1e-5)
        assert row["loss/total"] == pytest.approx(row["loss/objective"] + a + b, rel=1e-5, abs=1e-6)


def test_kl_penalty_against_frozen_initial_policy(tmp_path: Path) -> None:
    rows = _trainer(tmp_path, steps=3, kl_coef=0.1, lr=1e-2).train()
    assert rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert rows[-1]["kl/ref"] > 0.0


def test_unknown_loss_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="vanilla"):
        _trainer(tmp_path, loss="nope")
    with pytest.raises(ConfigError):
        _config(mini_batches=3)  # 16 rows do not split into 3
    with pytest.raises(ConfigError):
        _config(agg="mean")
    with pytest.raises(ConfigError):
        _config(advantage="rloo", group_size=1)


def test_custom_loss_is_looked_up_by_name(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def my_loss(old_log_prob, log_prob, advantages, mask, *, agg, counts, norm_length, scale):
        seen["scale"] = scale
        return scale * aggregate(-advantages * log_prob, mask, agg, counts=counts), {"mine/x": torch.tensor(1.0)}

    plugins = build_plugin_manager(load_entrypoints=False)
    plugins.registries["loss"].add(Registered(Component("mine", my_loss), owner="test"))
    rows = _trainer(tmp_path, plugins=plugins, steps=1, loss="mine", loss_options={"scale": 3.0}).train()
    assert seen["scale"] == 3.0 and rows[0]["mine/x"] == 1.0


def test_bf16_mixed_precision_runs(tmp_path: Path) -> None:
    rows = _trainer(tmp_path, steps=2, mixed_precision="bf16", lr=1e-2).train()
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert rows[-1]["optim/grad_norm"] > 0
    # accelerate's prepared forward autocasts both the old-log-prob pass and the update: ratio is one
    assert all(r["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) for r in rows)


def test_accelerator_with_its_own_accumulation_is_rejected(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        GRPOTrainer(model, char_tokenizer(), _StartsEven(digits=1), _config(), run_dir=tmp_path,
                    accelerator=Accelerator(gradient_accumulation_steps=2),
                    plugins=build_plugin_manager(load_entrypoints=False))


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_another_architecture_and_dropout(tmp_path: Path, disable_dropout: bool) -> None:
    """GPT-2 (another HF causal LM, with dropout layers): the loop runs, and with dropout disabled the
    single-epoch ratio is exactly one; with dropout left on it is not (the control)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = char_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    trainer = GRPOTrainer(model, tok, _StartsEven(digits=1), _config(steps=2, disable_dropout=disable_dropout),
                          run_dir=tmp_path, plugins=build_plugin_manager(load_entrypoints=False))
    rows = trainer.train()
    ratios = [r["policy/ratio_mean"] for r in rows]
    if disable_dropout:
        assert all(r == pytest.approx(1.0, abs=1e-6) for r in ratios)
    else:
        assert any(abs(r - 1.0) > 1e-3 for r in ratios)
