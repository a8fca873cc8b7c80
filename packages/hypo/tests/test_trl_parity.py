"""Optional: the same per-sequence losses as TRL's DPOTrainer on a tiny model (skipped without trl)."""

from __future__ import annotations

import copy

import pytest
from hypo import KINDS, PreferencePair, dpo_loss, tokenize_pairs
from hypo.reference import compute_reference_logps

from klcore.toy import tiny_causal_lm, tiny_config

ROWS = [{"prompt": "1+2=", "chosen": "3", "rejected": "45"}, {"prompt": "10+5=", "chosen": "15", "rejected": "5"}]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_trl_dpo_trainer(kind: str, tokenizer, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    model, ref = tiny_causal_lm(tiny_config("tiny"), seed=0), tiny_causal_lm(tiny_config("tiny"), seed=1)
    eps = 0.2 if kind == "robust" else 0.0
    args = DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], loss_type=[kind], beta=0.3,
        label_smoothing=eps, use_cpu=True, disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=args,
        train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tokenizer,
    )
    trainer.model.eval()
    trl_loss = float(trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader()))))

    # TRL tokenizes "prompt" with the tokenizer's special tokens (the toy one adds BOS, as Llama's does)
    # and "completion <eos>" without
    data = tokenize_pairs([PreferencePair(**r) for r in ROWS], tokenizer, add_bos=True)
    pc, pr = compute_reference_logps(model, data)
    rc, rr = compute_reference_logps(ref, data)
    ours, _ = dpo_loss(
        pc, pr, rc, rr, beta=0.3, kind=kind, label_smoothing=eps,
        chosen_lengths=data.chosen_mask.sum(1), rejected_lengths=data.rejected_mask.sum(1),
    )
    assert float(ours.mean()) == pytest.approx(trl_loss, rel=2e-3)
