"""DistillTrainer on the real-model path: a prompt dataset (klcore.data) rendered with a Qwen-style chat
template (no BOS, EOS as pad), tiny Qwen2 student and teacher, and a LoRA student through klcore.models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opd_distill import DistillConfig, DistillTrainer, PacedConfig
from transformers import Qwen2Config, Qwen2ForCausalLM

from klcore.data import DataConfig, load_prompts
from klcore.models import LoraConfig, add_lora
from klcore.rewards import exact_match
from klcore.toy.tokenizer import chat_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _qwen(tok, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


@pytest.fixture
def prompts(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"{a}+{b}=", "solution": str(a + b)} for a in range(6) for b in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = chat_tokenizer()
    data = load_prompts(DataConfig(path=str(path), prompt_field="question", answer_field="solution", chat="on",
                                   test_fraction=0.25), tok, reward=exact_match(field="solution"))
    return tok, data


def _config(**kw: object) -> DistillConfig:
    base = dict(steps=2, prompts_per_step=4, group_size=2, problem_pool=8, eval_problems=4, max_new_tokens=4,
                progress=False, lr=1e-2, loss="full_reverse_kl", paced=PacedConfig(weighting="paced", samples=2))
    return DistillConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_distillation_on_a_chat_prompt_dataset(tmp_path: Path, prompts) -> None:  # type: ignore[no-untyped-def]
    tok, data = prompts
    student, teacher = _qwen(tok, 0), _qwen(tok, 1)
    trainer = DistillTrainer(student, teacher, tok, data, _config(), run_dir=tmp_path / "run", eval_tasks={"add": data},
                             teacher_tokenizer=chat_tokenizer())
    batch, _ = trainer.collect(0)
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first[: len(tok.encode("<|im_start|>user"))] == tok.encode("<|im_start|>user")  # the template, no BOS
    pad = tok.pad_token_id
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()  # EOS pads, outside the mask
    history = trainer.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss/total"])) for h in history)
    assert "eval/add_pass@1" in history[0] and "data/dropped_too_long" in history[0]


def test_a_lora_student_trains_only_its_adapters(tmp_path: Path, prompts) -> None:  # type: ignore[no-untyped-def]
    tok, data = prompts
    student = add_lora(_qwen(tok, 0), LoraConfig(r=4, alpha=8))
    teacher = _qwen(tok, 1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillTrainer(student, teacher, tok, data, _config(lr=5e-2, paced=PacedConfig()),
                             run_dir=tmp_path / "lora")
    trainer.train()
    after = dict(trainer.unwrapped_model.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
    assert moved and all("lora_" in n for n in moved)
