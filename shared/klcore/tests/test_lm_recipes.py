"""The real-model path end to end: a tiny Qwen2 (head_dim 64, tied embeddings) and a Qwen-style tokenizer
saved to a folder, `klcore run grpo` on a jsonl file with math_verify and on a reasoning_gym task, with
and without LoRA; the saved model reloads with `from_pretrained`; resume equals the uninterrupted run;
the LoRA KL reference is the base model; `klcore run evaluate` computes pass@k with intervals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from klcore.cli import main
from klcore.data import DataConfig, load_prompts
from klcore.lm_recipes import EvaluateConfig, pass_at_k_report
from klcore.models import LoraConfig, ModelConfig, add_lora, load_causal_lm, save_final
from klcore.rewards import exact_match
from klcore.toy.tokenizer import chat_tokenizer
from klcore.trainer import GRPOConfig
from klcore.trainer.grpo import GRPOTrainer, policy_forward
from klcore.trainer.run_folder import checkpoint_name

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen")
    tok = chat_tokenizer()
    config = Qwen2Config(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root)  # 96 rows: a head padded past the tokenizer's 85 tokens
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": f"{a}+{b}=", "solution": str(a + b)} for a in range(10) for b in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _grpo(out: Path, model_dir: Path, *extra: str) -> dict:
    args = ["run", "grpo", "--out", str(out), "--set", f"model={model_dir}", "--set", "trainer.steps=2",
            "--set", "trainer.prompts_per_step=2", "--set", "trainer.group_size=4", "--set", "trainer.max_new_tokens=6",
            "--set", "trainer.eval_problems=4", "--set", "trainer.progress=false", "--set", "trainer.lr=1e-3", *extra]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.mark.parametrize("lora", [0, 4])
def test_grpo_on_a_jsonl_file_with_math_verify(tmp_path, model_dir, data_file, lora) -> None:
    summary = _grpo(tmp_path / "run", model_dir, "--set", f"data.path={data_file}", "--set", "data.prompt_field=question",
                    "--set", "data.answer_field=solution", "--set", "reward=math_verify", "--set", f"lora.r={lora}")
    assert summary["steps"] == 2 and summary["data/dropped_bad"] == 0
    final = Path(summary["final"])
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    assert not (final / "adapter_config.json").exists()  # merged by default
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert reloaded.config.vocab_size == 96 and reloaded.config.tie_word_embeddings
    if not lora:  # the saved weights are the trainer's last ones (its final checkpoint)
        checkpoint = load_file(next((tmp_path / "run" / "checkpoints").glob("*/model.safetensors")))
        for name, value in reloaded.state_dict().items():
            if name in checkpoint:
                torch.testing.assert_close(value, checkpoint[name], rtol=0, atol=0)


def test_grpo_on_a_reasoning_gym_task(tmp_path, model_dir) -> None:
    pytest.importorskip("reasoning_gym")
    summary = _grpo(tmp_path / "run", model_dir, "--set", "task=reasoning_gym",
                    "--set", 'task_options={dataset = "leg_counting", size = 30}', "--set", "save=none")
    assert summary["steps"] == 2 and summary["final"] is None
    rows = _metrics(tmp_path / "run")
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)


@pytest.mark.parametrize("merged", [True, False])
def test_saved_lora_model_reloads_with_equal_logits(tmp_path, model_dir, merged) -> None:
    model, tok = load_causal_lm(ModelConfig(model=str(model_dir), lora=LoraConfig(r=4)))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained adapter: it changes the output
    ids = torch.tensor([[3, 9, 4, 11, 2, 7]])
    expected = _logits(model, ids)
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    save_final(model, tok, folder, merged=merged)
    assert (folder / "adapter_config.json").exists() is not merged
    assert (folder / "notes.txt").read_text() == "mine"
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def _digit_share(completions, rows):
    """A reward with signal for a random model: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _lora_trainer(run_dir: Path, model_dir: Path, data_file: Path, steps: int, resume: bool = False) -> GRPOTrainer:
    torch.manual_seed(0)  # the adapter's initialisation
    model, tok = load_causal_lm(ModelConfig(model=str(model_dir), lora=LoraConfig(r=4)))
    task = load_prompts(DataConfig(path=str(data_file), prompt_field="question", answer_field="solution"), tok,
                        reward=_digit_share)
    config = GRPOConfig(steps=steps, lr=3e-2, prompts_per_step=2, group_size=4, max_new_tokens=6, kl_coef=0.1,
                        eval_problems=4, checkpoint_every=1, resume=resume, progress=False)
    return GRPOTrainer(model, tok, task, config, run_dir=run_dir, eval_tasks={"sums": task})


def test_resume_equals_the_uninterrupted_run(tmp_path, model_dir, data_file) -> None:
    whole = _lora_trainer(tmp_path / "whole", model_dir, data_file, steps=3).train()
    # a run killed after its step-2 checkpoint: the folder as it was then
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / checkpoint_name(3))
    (tmp_path / "cut" / "checkpoints" / "latest").write_text(checkpoint_name(2))
    resumed = _lora_trainer(tmp_path / "cut", model_dir, data_file, steps=3, resume=True).train()
    assert len(whole) == len(resumed) == 3
    assert whole[2]["kl/ref"] > 0  # the policy has left the reference by then
    for a, b in zip(whole, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith("perf/"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_lora_kl_reference_is_the_base_model(tmp_path, model_dir, data_file) -> None:
    model, tok = load_causal_lm(ModelConfig(model=str(model_dir), lora=LoraConfig(r=4)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    task = load_prompts(DataConfig(path=str(data_file), prompt_field="question", answer_field="solution"), tok,
                        reward=exact_match())
    config = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, kl_coef=0.1, progress=False)
    trainer = GRPOTrainer(model, tok, task, config, run_dir=tmp_path)
    assert trainer.ref_model is None and trainer.ref_is_base
    batch, _ = trainer.collect(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        base_log_prob, _ = policy_forward(base, batch, 1.0)
    mask = batch["response_mask"]
    torch.testing.assert_close(batch["ref_log_prob"][mask], base_log_prob[mask], rtol=1e-5, atol=1e-5)
    assert (batch["old_log_prob"] - batch["ref_log_prob"])[mask].abs().max() > 1e-3  # the adapter is on


def test_add_lora_refuses_unknown_modules(model_dir) -> None:
    from klcore.errors import ConfigError

    with pytest.raises(ConfigError, match="target_modules"):
        add_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["nope"]))


class _KnownCorrect:
    """A dataset task whose reward marks the first ``c_p`` samples of prompt p correct."""

    def __init__(self, prompts, correct, n) -> None:
        self._prompts, self.correct, self.n, self.calls = prompts, correct, n, 0

    def items(self, split):
        return self._prompts

    def score(self, problems, completions):
        out = []
        for i in range(len(completions)):
            p = self.calls + i // self.n
            out.append(1.0 if i % self.n < self.correct[p] else 0.0)
        self.calls += len(completions) // self.n
        return out


def test_pass_at_k_report_matches_closed_forms(model_dir, data_file) -> None:
    from scipy import stats

    model, tok = load_causal_lm(ModelConfig(model=str(model_dir)))
    task = load_prompts(DataConfig(path=str(data_file), prompt_field="question", answer_field="solution"), tok)
    prompts = task.items("train")[:5]
    correct, n = [0, 1, 2, 4, 3], 4
    config = EvaluateConfig(model=str(model_dir), ks=[1, 2], samples=n, max_new_tokens=3, prompts_per_batch=2)
    report = pass_at_k_report(model, tok, _KnownCorrect(prompts, correct, n), config)
    for k in (1, 2):
        values = [1 - math.comb(n - c, k) / math.comb(n, k) for c in correct]
        mean = sum(values) / len(values)
        half = stats.t.ppf(0.975, len(values) - 1) * stats.tstd(values) / math.sqrt(len(values))
        got = report[f"pass@{k}"]
        assert got["n"] == 5 and got["mean"] == pytest.approx(mean)
        assert got["ci_low"] == pytest.approx(mean - half) and got["ci_high"] == pytest.approx(mean + half)
    assert report["reward/mean"]["mean"] == pytest.approx(sum(correct) / (n * 5))


def test_evaluate_recipe_writes_its_summary(tmp_path, model_dir, data_file) -> None:
    out = tmp_path / "eval"
    assert main(["run", "evaluate", "--out", str(out), "--set", f"model={model_dir}", "--set", f"data.path={data_file}",
                 "--set", "data.prompt_field=question", "--set", "data.answer_field=solution", "--set", "split=all",
                 "--set", "max_prompts=6", "--set", "max_new_tokens=3", "--set", "ks=[1, 2]", "--set", "samples=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 6 and set(summary) >= {"pass@1", "pass@2", "reward/mean"}
    assert 0.0 <= summary["pass@1"]["mean"] <= summary["pass@2"]["mean"] <= 1.0


def test_grpo_without_prompts_is_a_clear_error(tmp_path, model_dir, capsys) -> None:
    assert main(["run", "grpo", "--out", str(tmp_path / "x"), "--set", f"model={model_dir}"]) == 2
    assert "data.path" in capsys.readouterr().err
