"""HyPOTrainer: lambda = 0 is DPO, cached reference log-probs, the online term, config errors."""

from __future__ import annotations

import math
from pathlib import Path

import hypo.reference
import pytest
import torch
import torch.nn.functional as F
from conftest import PAIRS
from hypo import HyPOConfig, HyPOTrainer
from hypo.data import PreferencePair, tokenize_pairs

from klcore.errors import ConfigError
from klcore.toy import tiny_causal_lm, tiny_config


def _model(seed: int = 0):  # type: ignore[no-untyped-def]
    return tiny_causal_lm(tiny_config("tiny"), seed=seed)


def _config(**kw: object) -> HyPOConfig:
    base = {"steps": 2, "lr": 1e-3, "pairs_per_step": 4, "progress": False, "group_size": 3}
    return HyPOConfig(**{**base, **kw})  # type: ignore[arg-type]


def _manual_seq_logp(model, tokenizer, prompt: str, completion: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """log π(completion <eos> | <bos> prompt) from one unpadded forward, written independently."""
    p = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    c = [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]
    ids = torch.tensor([p + c])
    logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
    return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c)[:, None]).sum()


def test_cached_reference_logps_equal_fresh_ones(tmp_path: Path, tokenizer, pairs, plugins, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    trainer = HyPOTrainer(model, tokenizer, pairs, _config(kl_coef=0.0), run_dir=tmp_path / "a", plugins=plugins)
    cache = tmp_path / "a" / "ref_logps.safetensors"
    assert cache.is_file()
    with torch.no_grad():
        fresh_c = torch.stack([_manual_seq_logp(model, tokenizer, p.prompt, p.chosen) for p in PAIRS])
        fresh_r = torch.stack([_manual_seq_logp(model, tokenizer, p.prompt, p.rejected) for p in PAIRS])
    torch.testing.assert_close(trainer.ref_chosen.double(), fresh_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trainer.ref_rejected.double(), fresh_r, rtol=1e-5, atol=1e-5)

    def no_recompute(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    # a second run on the same data and reference model reads the cache instead of recomputing
    monkeypatch.setattr(hypo.reference, "compute_reference_logps", no_recompute)
    cfg = _config(kl_coef=0.0, ref_cache=str(cache))
    again = HyPOTrainer(_model(), tokenizer, pairs, cfg, run_dir=tmp_path / "b", plugins=plugins)
    assert torch.equal(again.ref_chosen, trainer.ref_chosen) and torch.equal(again.ref_rejected, trainer.ref_rejected)
    monkeypatch.undo()
    # another reference model (or other data) invalidates the cache
    with pytest.warns(UserWarning, match="recomputing"):
        other = HyPOTrainer(_model(seed=1), tokenizer, pairs, cfg, run_dir=tmp_path / "c", plugins=plugins)
    assert not torch.allclose(other.ref_chosen, trainer.ref_chosen)


def test_lambda_zero_is_dpo_loss_and_gradient(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    model = _model(seed=1)
    reference = _model(seed=0)
    beta = 0.25
    trainer = HyPOTrainer(
        model, tokenizer, pairs, _config(kl_coef=0.0, beta=beta), run_dir=tmp_path, plugins=plugins,
        ref_model=reference,
    )
    batch, metrics = trainer.collect(0)
    assert not any(k.startswith("online_") for k in batch) and "kl/online" not in metrics
    counts = hypo_counts(batch)
    loss, _, _ = trainer.compute_loss(batch, counts)
    (grads,) = [torch.autograd.grad(loss, list(model.parameters()))]

    # independent DPO: unpadded forwards, -log sigmoid(beta * delta), mean over the step's pairs
    chosen_ids = batch["chosen_responses"]
    picked = []
    for row in range(chosen_ids.shape[0]):
        prompt_tokens = batch["chosen_input_ids"][row][batch["chosen_attention_mask"][row].bool()]
        text = tokenizer.decode(prompt_tokens, skip_special_tokens=True)
        picked.append(next(p for p in PAIRS if p.prompt + p.chosen == text))
    total = torch.zeros((), dtype=torch.float64)
    for p in picked:
        with torch.no_grad():
            rc = _manual_seq_logp(reference, tokenizer, p.prompt, p.chosen)
            rr = _manual_seq_logp(reference, tokenizer, p.prompt, p.rejected)
        pc = _manual_seq_logp(model, tokenizer, p.prompt, p.chosen)
        pr = _manual_seq_logp(model, tokenizer, p.prompt, p.rejected)
        total = total - F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    expected = total / len(picked)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - math.log(2)) > 1e-3  # the policy is not its reference
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)


def hypo_counts(batch):  # type: ignore[no-untyped-def]
    from klcore.reduce import global_counts

    return global_counts(batch["chosen_response_mask"])


def test_online_term_adds_lambda_times_surrogate(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    """With lambda > 0 the loss is the DPO loss plus lambda x the RLOO surrogate on the stored samples."""
    from hypo import dpo_loss, rloo_kl_surrogate
    from hypo.forward import completion_logprobs

    model = _model()
    trainer = HyPOTrainer(model, tokenizer, pairs, _config(kl_coef=0.5), run_dir=tmp_path, plugins=plugins)
    batch, metrics = trainer.collect(0)
    assert batch["online_input_ids"].shape[:2] == (4, 3)
    assert metrics["response/length_mean"] >= 1
    loss, step_metrics, _ = trainer.compute_loss(batch, hypo_counts(batch))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    seqs = {k: batch[f"online_{k}"].flatten(0, 1) for k in ("input_ids", "attention_mask", "position_ids",
                                                             "responses", "response_mask")}
    online = completion_logprobs(model, seqs)
    surrogate, _ = rloo_kl_surrogate(
        online, batch["online_ref_log_prob"].flatten(0, 1), seqs["response_mask"], group_size=3, coef=0.5
    )
    side = {}
    for which in ("chosen", "rejected"):
        s = {k: batch[f"{which}_{k}"] for k in ("input_ids", "attention_mask", "position_ids", "responses",
                                                 "response_mask")}
        side[which] = completion_logprobs(model, s).sum(-1)
    dpo, _ = dpo_loss(side["chosen"], side["rejected"], batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    expected = dpo.mean() + surrogate
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    for g, e in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # at step 0 the policy is the reference: the sampled log-ratio is zero
    assert step_metrics["kl/online"] == pytest.approx(0.0, abs=1e-5)


def test_training_logs_the_metrics(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    prompts = pairs.prompts(torch.arange(2))
    trainer = HyPOTrainer(
        _model(), tokenizer, pairs, _config(steps=3, kl_coef=0.2, eval_samples=2), run_dir=tmp_path,
        plugins=plugins, eval_prompts=prompts, reward_fn=lambda prompt, completion: float(completion == "3"),
    )
    history = trainer.train()
    assert len(history) == 3
    first, last = history[0], history[-1]
    for key in ("dpo/loss", "rewards/margin", "rewards/accuracy", "kl/online", "response/length_mean",
                "eval/reverse_kl", "eval/length_mean", "eval/reward"):
        assert math.isfinite(first[key]), key
    assert first["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    assert "eval/reverse_kl_final" in last
    assert last["dpo/loss"] != first["dpo/loss"]  # the policy moved
    assert (tmp_path / "metrics.jsonl").is_file()


def test_config_and_data_errors(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="group_size"):
        _config(group_size=1)
    with pytest.raises(ConfigError, match="mini_batches"):
        _config(mini_batches=2)
    with pytest.raises(ConfigError, match="beta"):
        _config(beta=-1.0)
    with pytest.raises(ConfigError, match="pairs_per_step"):
        HyPOTrainer(_model(), tokenizer, pairs, _config(pairs_per_step=99), run_dir=tmp_path, plugins=plugins)
    few = tokenize_pairs([PreferencePair("1=", "1", "2")], tokenizer)
    with pytest.raises(ConfigError, match="1 pairs"):
        HyPOTrainer(_model(), tokenizer, few, _config(pairs_per_step=2), run_dir=tmp_path, plugins=plugins)


def test_micro_batches_sum_to_the_full_batch_gradient(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    model = _model(seed=1)
    trainer = HyPOTrainer(
        model, tokenizer, pairs, _config(kl_coef=0.3), run_dir=tmp_path, plugins=plugins, ref_model=_model()
    )
    batch, _ = trainer.collect(0)
    counts = hypo_counts(batch)
    params = list(model.parameters())
    full, _, _ = trainer.compute_loss(batch, counts)
    full_grads = torch.autograd.grad(full, params)
    parts = [trainer.compute_loss({k: v[s : s + 2] for k, v in batch.items()}, counts)[0] for s in (0, 2)]
    for g, e in zip(torch.autograd.grad(sum(parts), params), full_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def _lora_model_away_from_base():  # type: ignore[no-untyped-def]
    """A LoRA-wrapped tiny model whose adapters are moved off zero (so policy != base), and its base copy."""
    import copy

    from klcore.models import LoraConfig, add_lora

    base = _model()
    frozen_base = copy.deepcopy(base).eval()
    model = add_lora(base, LoraConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model, frozen_base


def test_lora_reference_is_the_adapter_disabled_base(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    """With a peft policy and no ref_model, the offline and online references are the base model's
    log-probs (adapters off), not a copy of the adapted policy."""
    from hypo.forward import completion_logprobs_chunked

    model, base = _lora_model_away_from_base()
    trainer = HyPOTrainer(model, tokenizer, pairs, _config(kl_coef=0.5), run_dir=tmp_path, plugins=plugins)
    assert trainer.ref_is_base and trainer.ref_model is None  # no second model in memory
    with torch.no_grad():
        want_c = torch.stack([_manual_seq_logp(base, tokenizer, p.prompt, p.chosen) for p in PAIRS])
        policy_c = torch.stack([_manual_seq_logp(model, tokenizer, p.prompt, p.chosen) for p in PAIRS])
    assert (policy_c - want_c).abs().max() > 1e-2  # the adapters matter, so the check below can fail
    torch.testing.assert_close(trainer.ref_chosen.double(), want_c, rtol=1e-5, atol=1e-5)
    batch, metrics = trainer.collect(0)
    rows = {k: batch[f"online_{k}"].flatten(0, 1) for k in ("input_ids", "attention_mask", "position_ids",
                                                           "responses", "response_mask")}
    torch.testing.assert_close(
        batch["online_ref_log_prob"].flatten(0, 1), completion_logprobs_chunked(base, rows, 64), rtol=1e-5, atol=1e-5
    )
    assert abs(metrics["kl/online_sampled"]) > 1e-3
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # adapters back on


def test_reference_under_the_policys_autocast_gives_zero_at_step_0(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    """bf16 mixed precision: the reference is scored under the same autocast as the policy, so at step 0
    (policy = reference) the DPO rewards and the online log-ratio are exactly 0."""
    cfg = _config(kl_coef=0.5, mixed_precision="bf16")
    trainer = HyPOTrainer(_model(), tokenizer, pairs, cfg, run_dir=tmp_path, plugins=plugins)
    batch, _ = trainer.collect(0)  # (kl/online_sampled compares cached decoding with a full forward: not exact)
    _, step_metrics, _ = trainer.compute_loss(batch, hypo_counts(batch))
    assert step_metrics["kl/online"] == 0.0
    assert step_metrics["rewards/margin"] == 0.0 and step_metrics["rewards/accuracy"] == 0.0


def test_online_samples_default_to_four_times_the_data_width_and_warn_when_truncated(tmp_path: Path, tokenizer, pairs, plugins) -> None:  # type: ignore[no-untyped-def]
    from hypo.trainer import ONLINE_WIDTH_FACTOR, online_width

    model = _model()
    trainer = HyPOTrainer(model, tokenizer, pairs, _config(kl_coef=0.5), run_dir=tmp_path, plugins=plugins)
    assert trainer.max_new_tokens == online_width(pairs, model) == ONLINE_WIDTH_FACTOR * pairs.chosen_ids.shape[1]
    own = HyPOTrainer(_model(), tokenizer, pairs, _config(kl_coef=0.5, max_new_tokens=2), run_dir=tmp_path / "b",
                      plugins=plugins)
    assert own.max_new_tokens == 2
    with pytest.warns(UserWarning, match="raise max_new_tokens"):
        _, metrics = own.collect(0)  # a random tiny model rarely says EOS within 2 tokens
    assert metrics["response/truncated"] > 0.5
