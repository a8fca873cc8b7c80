"""TRL (one training step of a tiny model) and verl (registry) integrations; skipped when not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klcore.errors import ConfigError


@pytest.mark.trl
@pytest.mark.slow
@pytest.mark.parametrize("cov_loss", ["clip_cov", "kl_cov"])
def test_trl_grpo_trainer_takes_a_step(tmp_path: Path, cov_loss: str) -> None:
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from entropy_rl.integrations.trl import CovGRPOTrainer
    from trl import GRPOConfig

    from klcore.toy import char_tokenizer, tiny_causal_lm, tiny_config

    tok = char_tokenizer()
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    data = datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+1=", "2+2="]})

    def reward(completions, **kwargs):
        return [float(len(c) > 0 and ord(c[0]) % 2 == 0) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
        beta=0.0, steps_per_generation=2, gradient_accumulation_steps=2, seed=0,
    )
    options = {"ratio": 0.5, "cov_bounds": [-100.0, 100.0]} if cov_loss == "clip_cov" else {"ratio": 0.5}
    trainer = CovGRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
        cov_loss=cov_loss, cov_options=options,
    )
    trainer.train()
    logged = {k for row in trainer.state.log_history for k in row}
    assert "cov/selected_frac" in logged
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    with pytest.raises(ConfigError, match="cov_loss"):
        CovGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                       cov_loss="ppo")


def test_verl_module_imports_without_verl() -> None:
    from entropy_rl.integrations import verl as integration

    assert integration.NAMES == ("clip_cov_klcore", "kl_cov_klcore")
    assert integration.REGISTERED in ((), integration.NAMES)
