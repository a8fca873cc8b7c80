"""``HyPODPOTrainer`` against TRL's own ``DPOTrainer`` (skipped without trl)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from klcore.errors import ConfigError
from klcore.toy import tiny_causal_lm, tiny_config

pytestmark = pytest.mark.trl
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from hypo.integrations.trl import HyPODPOTrainer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROWS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "45"},
    {"prompt": "10+5=", "chosen": "15", "rejected": "5"},
    {"prompt": "7+7=", "chosen": "14", "rejected": "41"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "22"},
]
#: every loss_type of TRL 1.16's DPOTrainer; HyPODPOTrainer accepts them all (its term is added to any of them)
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


@pytest.fixture(autouse=True)
def _cpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")


def _args(tmp_path, **overrides) -> DPOConfig:  # type: ignore[no-untyped-def]
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], beta=0.3, use_cpu=True,
        disable_tqdm=True, seed=0, save_strategy="no", bf16=False,  # TRL's configs default to bf16 autocast
    )
    options.update(overrides)
    return DPOConfig(**options)


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_causal_lm(tiny_config("tiny"), seed=0), tiny_causal_lm(tiny_config("tiny"), seed=1)


def _trainer(cls, tokenizer, args, model, ref, **kwargs):  # type: ignore[no-untyped-def]
    return cls(
        model=copy.deepcopy(model), ref_model=copy.deepcopy(ref) if ref is not None else None, args=args,
        train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tokenizer, **kwargs,
    )


def _batch(trainer) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))


def _loss_and_grads(trainer, batch) -> tuple[float, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
    return float(loss), grads


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_lambda_zero_is_trl_dpo(loss_type: str, tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kl_coef = 0: the loss and every gradient equal TRL's DPOTrainer on the same batch."""
    eps = {"robust": 0.2, "exo_pair": 1e-3}.get(loss_type, 0.0)
    args = _args(tmp_path, loss_type=[loss_type], label_smoothing=eps)
    model, ref = _models()
    stock = _trainer(DPOTrainer, tokenizer, args, model, ref)
    ours = _trainer(HyPODPOTrainer, tokenizer, args, model, ref, kl_coef=0.0)
    batch = _batch(stock)
    stock_loss, stock_grads = _loss_and_grads(stock, batch)
    our_loss, our_grads = _loss_and_grads(ours, batch)
    assert our_loss == pytest.approx(stock_loss, rel=1e-6, abs=1e-7)
    assert len(our_grads) == len(stock_grads)
    for g_ours, g_stock in zip(our_grads, stock_grads, strict=True):
        torch.testing.assert_close(g_ours, g_stock, rtol=1e-5, atol=1e-7)
    assert stock_loss != 0 or loss_type in ("hinge",)  # the batch carries a signal


def _hand_sequence_logps(model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each row's completion, from plain logits (no TRL code)."""
    out = []
    for ids, attn, comp in zip(rows["input_ids"], rows["attention_mask"], rows["completion_mask"], strict=True):
        n = int(attn.sum())
        logits = model(input_ids=ids[None, :n]).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        total = logits.new_zeros((), dtype=torch.float32)
        for t in range(1, n):
            if comp[t]:
                total = total + logp[t - 1, ids[t]]
        out.append(total)
    return torch.stack(out)


def test_online_term_follows_hypo_formula(tokenizer, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """kl_coef > 0: loss = TRL's DPO loss + λ mean_x (1/k) Σ_i (r_i - b_i) log π(y_i|x) on the drawn samples, by hand."""
    lam, k = 0.5, 3
    model, ref = _models()
    ours = _trainer(HyPODPOTrainer, tokenizer, _args(tmp_path), model, ref, kl_coef=lam, group_size=k, max_new_tokens=6)
    drawn: list[dict[str, torch.Tensor]] = []
    sample = ours._sample_online

    def spy(prompts):  # type: ignore[no-untyped-def]
        drawn.append(sample(prompts))
        return drawn[-1]

    monkeypatch.setattr(ours, "_sample_online", spy)
    batch = _batch(ours)
    loss, grads = _loss_and_grads(ours, batch)
    rows = drawn[0]
    assert rows["input_ids"].shape[0] == 2 * k

    # the samples: k per prompt of the batch, each starting with its prompt
    prompts = [r["prompt"] for r in ROWS[:2]]
    for i, ids in enumerate(rows["input_ids"]):
        text = tokenizer.decode(ids[rows["attention_mask"][i].bool()], skip_special_tokens=True)
        assert text.startswith(prompts[i // k])

    # by hand, with the same policy / reference weights
    ours.model.zero_grad()
    dpo = DPOTrainer.compute_loss(ours, ours.model, batch)
    seq = _hand_sequence_logps(ours.model, rows)
    with torch.no_grad():
        ref_seq = _hand_sequence_logps(ours.ref_model, rows)
    r = (seq - ref_seq).detach()
    surrogate = seq.new_zeros(())
    for p in range(2):
        for i in range(k):
            others = [r[p * k + j] for j in range(k) if j != i]
            baseline = sum(others) / (k - 1)
            surrogate = surrogate + (r[p * k + i] - baseline) * seq[p * k + i] / k
    expected = dpo + lam * surrogate / 2
    expected.backward()
    hand_grads = [p.grad.clone() for p in ours.model.parameters() if p.requires_grad]
    assert loss == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    for g, h in zip(grads, hand_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    assert ours._metrics["train"]["kl/online"][-1] == pytest.approx(float(r.mean()), rel=1e-5, abs=1e-6)
    assert ours._metrics["train"]["kl/surrogate"][-1] == pytest.approx(lam * float(surrogate) / 2, rel=1e-4, abs=1e-6)
    # the term moves the gradient (it is not the DPO gradient alone)
    ours.model.zero_grad()
    DPOTrainer.compute_loss(ours, ours.model, batch).backward()
    dpo_grads = [p.grad.clone() for p in ours.model.parameters() if p.requires_grad]
    assert any(not torch.allclose(g, d) for g, d in zip(grads, dpo_grads, strict=True))


def test_reference_scored_under_the_policys_autocast(tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bf16 autocast: with reference = policy weights every online log-ratio is exactly 0 (both under one autocast)."""
    model, _ = _models()
    ours = _trainer(HyPODPOTrainer, tokenizer, _args(tmp_path, bf16=True), model, model, kl_coef=0.1, group_size=2,
                    max_new_tokens=4)
    assert ours.accelerator.mixed_precision == "bf16"
    rows = ours._sample_online([[1, 5, 6], [1, 7]])
    with torch.no_grad():
        policy = ours._completion_logps(ours.accelerator.unwrap_model(ours.model), rows)
        ref = ours._reference_logps(rows)
        fp32 = _hand_sequence_logps(copy.deepcopy(model), rows)
    assert torch.equal(policy, ref)
    assert not torch.allclose(policy.sum(-1), fp32, atol=1e-4)  # autocast does change the numbers here


def test_samples_come_from_trl_generation_with_unbiased_sampling(tokenizer, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, ref = _models()
    ours = _trainer(HyPODPOTrainer, tokenizer, _args(tmp_path), model, ref, kl_coef=0.1, group_size=2, max_new_tokens=5)
    seen = []
    generate = type(ours.model).generate

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["generation_config"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(ours.model), "generate", spy)
    rows = ours._sample_online([[1, 5, 6], [1, 7]])
    (config,) = seen
    assert config.do_sample and config.temperature == 1.0 and config.top_k == 0 and config.top_p == 1.0
    assert rows["input_ids"].shape[0] == 4
    eos = tokenizer.eos_token_id
    for ids, comp, ended in zip(rows["input_ids"], rows["completion_mask"], rows["ended"], strict=True):
        tokens = ids[comp.bool()].tolist()
        assert 1 <= len(tokens) <= 5
        assert (eos not in tokens[:-1]) and bool(ended) == (tokens[-1] == eos)


def test_peft_reference_is_adapter_disabled_model(tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm(tiny_config("tiny"), seed=0)
    frozen_base = copy.deepcopy(base)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours = HyPODPOTrainer(
        model=base, args=_args(tmp_path, max_steps=1, logging_steps=1), train_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=tokenizer, peft_config=lora, kl_coef=0.5, group_size=2, max_new_tokens=4,
    )
    assert ours.ref_model is None
    rows = ours._sample_online([[1, 5, 6], [1, 7, 8, 9]])
    ref = ours._reference_logps(rows).sum(-1)
    with torch.no_grad():
        expected_ref = _hand_sequence_logps(frozen_base, rows)
        policy = _hand_sequence_logps(ours.model, rows)
    torch.testing.assert_close(ref, expected_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, expected_ref, atol=1e-3)  # the adapters are on for the policy
    ours.train()
    logged = [h for h in ours.state.log_history if "kl/online" in h]
    assert logged and logged[0]["kl/online"] != 0.0


def test_two_training_steps(tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, ref = _models()
    args = _args(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-3)
    ours = _trainer(HyPODPOTrainer, tokenizer, args, model, ref, kl_coef=0.2, group_size=2, max_new_tokens=4)
    before = [p.detach().clone() for p in ours.model.parameters()]
    ours.train()
    logs = [h for h in ours.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("loss", "kl/online", "kl/online_std", "kl/surrogate", "response/length_mean",
                    "response/truncated", "rewards/chosen", "rewards/margins"):
            assert math.isfinite(h[key]), key
    assert any(not torch.equal(b, p) for b, p in zip(before, ours.model.parameters(), strict=True))


@pytest.mark.parametrize(
    "options",
    [{"kl_coef": -0.1}, {"kl_coef": float("nan")}, {"kl_coef": True}, {"group_size": 1}, {"group_size": 2.0},
     {"max_new_tokens": 0}],
)
def test_bad_options_raise_config_error(options, tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, ref = _models()
    with pytest.raises(ConfigError):
        _trainer(HyPODPOTrainer, tokenizer, _args(tmp_path), model, ref, **options)


def test_no_reference_for_online_samples_raises(tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _ = _models()
    args = _args(tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="ref_model"):
        _trainer(HyPODPOTrainer, tokenizer, args, model, None, kl_coef=0.1)
