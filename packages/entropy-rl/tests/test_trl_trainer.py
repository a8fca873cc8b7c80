"""``CovGRPOTrainer`` against the real TRL ``GRPOTrainer``: parity when switched off, the formula when on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from klcore.errors import ConfigError

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from entropy_rl.integrations.trl import CovGRPOTrainer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from klcore.toy import char_tokenizer, tiny_causal_lm, tiny_config  # noqa: E402

pytestmark = pytest.mark.trl

B, P, T = 4, 3, 5  # rows, prompt length, completion length
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# every GRPOConfig option the loss touches, switched on at once
ALL_OPTIONS: dict[str, Any] = {
    "epsilon": 0.1, "epsilon_high": 0.15, "delta": 1.3, "top_entropy_quantile": 0.6, "off_policy_mask_threshold": 0.02,
    "entropy_coef": 0.03,
}
REF_KL_BETA = 0.05  # GRPOConfig(beta=...): set on the trainers after construction (TRL would load a reference
# model by hub name, which a model built from a config lacks); the loss reads only trainer.beta


def _reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def _config(tmp_path: Path, **overrides: Any) -> GRPOConfig:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": B, "num_generations": B, "max_completion_length": T,
        "report_to": [], "use_cpu": True, "save_strategy": "no", "beta": 0.0, "seed": 0, "logging_steps": 1,
    }
    settings.update(overrides)
    return GRPOConfig(**settings)


def _trainers(tmp_path: Path, cov_loss: str, cov_options: dict, **config: Any) -> tuple[GRPOTrainer, CovGRPOTrainer]:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0).train()
    tok = char_tokenizer()
    data = datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4="]})
    common = {"model": model, "reward_funcs": _reward, "train_dataset": data, "processing_class": tok}
    stock = GRPOTrainer(args=_config(tmp_path / "stock", **config), **common)
    ours = CovGRPOTrainer(args=_config(tmp_path / "cov", **config), cov_loss=cov_loss, cov_options=cov_options, **common)
    for trainer in (stock, ours):
        trainer.current_gradient_accumulation_steps = 2  # the normalisers must divide by it
    return stock, ours


def _completion_log_probs(trainer: GRPOTrainer, inputs: dict) -> torch.Tensor:
    """Per-token log-probs of the completion from TRL's own forward (its fused LM head), ``[B, T]``, no grad."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)[0]


def _batch(trainer: GRPOTrainer, *, spread: float = 0.3) -> dict[str, torch.Tensor]:
    """One micro-batch as TRL's ``_generate_and_score_completions`` hands it over (off-policy: old != current)."""
    g = torch.Generator().manual_seed(1)
    vocab = trainer.model.config.vocab_size
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[3, 2:] = 0
    inputs = {
        "prompt_ids": torch.randint(4, vocab, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (B, T), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -0.9]),
        "num_items_in_batch": completion_mask.sum() * 2.0,  # the generation batch spans two micro-batches
    }
    current = _completion_log_probs(trainer, inputs)
    inputs["old_per_token_logps"] = current + spread * torch.randn(B, T, generator=g)
    inputs["ref_per_token_logps"] = current + 0.2 * torch.randn(B, T, generator=g)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.05 * torch.randn(B, T, generator=g)
    inputs["importance_sampling_ratio"] = 0.5 + torch.rand(B, T, generator=g)
    return inputs


def _loss_and_grad(trainer: GRPOTrainer, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_same(a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
    assert len(a[1]) == len(b[1]) > 0
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


OFF = {"clip_cov": {"ratio": 0.5, "cov_bounds": (1e8, 1e9)}, "kl_cov": {"ratio": 0.5, "beta": 0.0}}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("cov_loss", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("options", ["defaults", "all"])
def test_switched_off_gives_trl_loss_and_gradient(tmp_path: Path, loss_type: str, cov_loss: str, options: str) -> None:
    config = {"loss_type": loss_type, **(ALL_OPTIONS if options == "all" else {})}
    stock, ours = _trainers(tmp_path, cov_loss, OFF[cov_loss], **config)
    if options == "all":
        for trainer in (stock, ours):
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
            trainer.beta = REF_KL_BETA
    inputs = _batch(stock)
    expected = _loss_and_grad(stock, inputs)
    _assert_same(_loss_and_grad(ours, inputs), expected)
    # TRL's metrics are kept beside ours
    logged = ours._metrics["train"]
    assert {"entropy", "clip_ratio/region_mean", "clip_ratio/high_max", "cov/selected_frac"} <= set(logged)
    assert logged["cov/selected_frac"][-1] == 0.0 if cov_loss == "clip_cov" else logged["cov/selected_frac"][-1] > 0
    if options == "all":
        assert {"kl", "entropy_coef"} <= set(logged)
        assert stock._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # the clip acts on this batch


def _hand_normalise(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, inputs: dict) -> torch.Tensor:
    m = mask.float()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum() / 2  # 2 accumulation steps
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (B * T) / 2
    if loss_type == "grpo":
        return ((per_token * m).sum(1) / m.sum(1)).mean() / 2
    return (per_token * m).sum() / (inputs["num_items_in_batch"] * 2 / 1)  # dapo: x GA (2) / steps_per_generation (1)


def _centred_product(lp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    v = mask.bool()
    lp_mean, adv_mean = lp[v].mean(), adv[v].mean()
    return torch.where(v, (lp - lp_mean) * (adv - adv_mean), torch.zeros(()))


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_clip_cov_detaches_the_selected_tokens(tmp_path: Path, loss_type: str) -> None:
    # bounds (0, 1e9) and ratio 0.99 select every unclipped token of positive covariance (fewer than 0.99 N)
    options = {"ratio": 0.99, "cov_bounds": (0.0, 1e9)}
    _, ours = _trainers(tmp_path, "clip_cov", options, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)
    inputs = _batch(ours)
    loss, _ = _loss_and_grad(ours, inputs)
    lp = _completion_log_probs(ours, inputs)
    mask = inputs["completion_mask"].bool()
    adv = inputs["advantages"][:, None].expand(B, T)
    rho = torch.exp(lp - inputs["old_per_token_logps"])
    unclipped, clipped = -adv * rho, -adv * rho.clamp(1 - 0.2, 1 + 0.28)
    ppo_clipped = clipped > unclipped
    cov = _centred_product(lp, adv, mask)
    selected = mask & ~ppo_clipped & (cov > 0)
    assert 0 < int(selected.sum()) <= int(0.99 * mask.sum()) and bool((mask & ~selected).any())
    per_token = torch.where(selected, torch.zeros(()), torch.maximum(unclipped, clipped))
    torch.testing.assert_close(loss, _hand_normalise(per_token, mask, loss_type, inputs), rtol=1e-5, atol=1e-7)
    assert ours._metrics["train"]["cov/selected_frac"][-1] == pytest.approx(float(selected.sum() / mask.sum()))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_kl_cov_penalises_the_top_covariance_tokens(tmp_path: Path, loss_type: str) -> None:
    # epsilon = inf: the paper's unclipped KL-Cov (Eq. 14), -A rho + beta |log rho| at the top-k covariance tokens
    options = {"ratio": 0.25, "beta": 0.7}
    _, ours = _trainers(tmp_path, "kl_cov", options, loss_type=loss_type, epsilon=math.inf)
    inputs = _batch(ours, spread=1.0)
    loss, _ = _loss_and_grad(ours, inputs)
    lp = _completion_log_probs(ours, inputs)
    mask = inputs["completion_mask"].bool()
    adv = inputs["advantages"][:, None].expand(B, T)
    log_ratio = lp - inputs["old_per_token_logps"]
    cov = _centred_product(lp, adv, mask).masked_fill(~mask, -math.inf)
    k = int(0.25 * int(mask.sum()))
    top = torch.zeros(B * T, dtype=torch.bool)
    top[cov.flatten().topk(k).indices] = True
    top = top.view(B, T)
    per_token = -adv * torch.exp(log_ratio) + 0.7 * log_ratio.abs() * top
    torch.testing.assert_close(loss, _hand_normalise(per_token, mask, loss_type, inputs), rtol=1e-5, atol=1e-7)
    # the penalty is what separates it from TRL's own (unclipped) loss
    without = _hand_normalise(-adv * torch.exp(log_ratio), mask, loss_type, inputs)
    assert float(loss - without) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("cov_loss", ["clip_cov", "kl_cov"])
def test_two_training_steps_with_a_tiny_model(tmp_path: Path, cov_loss: str) -> None:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    data = datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+1=", "2+2="]})
    args = _config(
        tmp_path, max_steps=2, learning_rate=1e-2, steps_per_generation=2, gradient_accumulation_steps=2,
        num_generations=4, max_completion_length=4, loss_type="dr_grpo", epsilon_high=0.28,
    )
    options = {"ratio": 0.5, "cov_bounds": (-100.0, 100.0)} if cov_loss == "clip_cov" else {"ratio": 0.5}
    trainer = CovGRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data,
                             processing_class=char_tokenizer(), cov_loss=cov_loss, cov_options=options)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    assert {"cov/selected_frac", "entropy", "clip_ratio/region_mean"} <= set(rows[0])
    assert rows[0]["cov/selected_frac"] > 0
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize(
    ("config", "options", "match"),
    [
        ({"loss_type": "cispo"}, {}, "cispo"),
        ({"loss_type": "sapo"}, {}, "sapo"),
        ({"loss_type": "vespo"}, {}, "vespo"),
        ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, {}, "luspo"),
        ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, {}, "importance_sampling_level"),
        ({}, {"clip": (0.2, 0.2)}, "epsilon"),
        ({}, {"beta": 1.0}, "unknown"),
        ({}, {"ratio": 2.0}, "ratio"),
    ],
)
def test_refused_options_raise_config_error(tmp_path: Path, config: dict, options: dict, match: str) -> None:
    data = datasets.Dataset.from_dict({"prompt": ["1+2="]})
    with pytest.raises(ConfigError, match=match):
        CovGRPOTrainer(model=tiny_causal_lm(tiny_config("tiny"), seed=0), reward_funcs=_reward,
                       args=_config(tmp_path, **config), train_dataset=data, processing_class=char_tokenizer(),
                       cov_loss="clip_cov", cov_options=options)
    with pytest.raises(ConfigError, match="cov_loss"):
        CovGRPOTrainer(model=tiny_causal_lm(tiny_config("tiny"), seed=0), reward_funcs=_reward, args=_config(tmp_path),
                       train_dataset=data, processing_class=char_tokenizer(), cov_loss="ppo")
