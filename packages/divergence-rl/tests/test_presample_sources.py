"""Pre-sampling from a prompt dataset with a chat template (klcore.data), and from a LoRA policy whose
reference is its adapter-disabled base model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from divergence_rl import (
    ExplorationTask,
    PresampleConfig,
    load_rehearsal,
    model_fingerprint,
    plugin,
    presample,
    read_shard,
)
from divergence_rl.store import shard_path

from klcore.data import DataConfig, load_prompts
from klcore.errors import ConfigError, DataError
from klcore.models import LoraConfig, add_lora
from klcore.plugins import build_plugin_manager
from klcore.toy import AdditionTask, tiny_causal_lm, tiny_config
from klcore.toy.tokenizer import chat_tokenizer
from klcore.trainer import GRPOConfig, GRPOTrainer


def first_char_even(completions, rows):
    """A dataset reward (completions, rows) -> floats: about half of a random policy's samples pass."""
    return [1.0 if c and ord(c[0]) % 2 == 0 else 0.0 for c in completions]


@pytest.fixture
def chat_data(tmp_path: Path):
    """A Qwen-style tokenizer (no BOS, <|im_start|> template, EOS as pad) and chat rows in a jsonl file."""
    tok = chat_tokenizer()
    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
            for a in range(6) for b in range(4)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(path=str(path), messages_field="messages", system_prompt="add", test_fraction=0.2)
    data = load_prompts(config, tok, reward=first_char_even)
    config_model = tiny_config("tiny", max_positions=128)
    config_model.vocab_size = len(tok)
    return tok, data, config, tiny_causal_lm(config_model, seed=0)


def _stored_rows(root: Path, chunks: int):
    for c in range(chunks):
        shard = read_shard(shard_path(root, c))
        pm, rm = shard["prompt_mask"].bool(), shard["response_mask"].bool()
        for i, owner in enumerate(shard["prompt_index"].tolist()):
            yield owner, shard["prompt_ids"][i][pm[i]], shard["response_ids"][i][rm[i]], shard["ref_log_prob"][i][rm[i]]


def _plain_log_probs(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Independent: one unpadded sequence, full logits, log-softmax, gather."""
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, response[:, None]).squeeze(-1)


def test_presample_a_chat_dataset_stores_its_templated_prompts_and_reward(chat_data, tmp_path) -> None:
    tok, data, _, model = chat_data
    train = data.items("train")
    cfg = PresampleConfig(num_prompts=0, samples=4, extra_sample=False, min_correct=2, chunk_size=8,
                          max_new_tokens=4)
    summary = presample(model, tok, data, cfg, tmp_path / "store")
    assert summary["prompts"] == len(train) > 8
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["prompts"] == [[p.prompt, p.answer] for p in train]  # the train split in file order
    model.eval()
    checked = 0
    for owner, prompt, response, logp in _stored_rows(tmp_path / "store", (len(train) + 7) // 8):
        assert prompt.tolist() == list(train[owner].ids)  # the chat-templated encoding, as the trainer sends it
        rendered = tok.decode(prompt)
        assert rendered.startswith("<|im_start|>system\nadd<|im_end|>") and rendered.endswith("assistant\n")
        assert first_char_even([tok.decode(response, skip_special_tokens=True)], [train[owner].row]) == [1.0]
        torch.testing.assert_close(logp, _plain_log_probs(model, prompt, response), rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == summary["stored_responses"] > 0
    # the exploration set as the dataset's own prompts, and a DPH step on it
    split = load_rehearsal(tmp_path / "store")
    explore = ExplorationTask.from_store(data, split)
    assert [p.ids for p in explore.problems_list] == [train[i].ids for i in split.exploration_index]
    assert sorted(split.exploration_index + split.rehearsal_index) == list(range(len(train)))
    plugins = build_plugin_manager(plugins=[("divergence_rl", plugin)], load_entrypoints=False)
    config = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, progress=False,
                        regularisers={"dph": {"path": str(tmp_path / "store"), "batch_size": 4}})
    rows = GRPOTrainer(model, tok, explore, config, run_dir=tmp_path / "run", plugins=plugins).train()
    assert rows[0]["dph/loss"] == pytest.approx(0.0, abs=1e-6) and "data/dropped_bad" in rows[0]


def test_the_exploration_set_refuses_other_data(chat_data, tmp_path) -> None:
    tok, data, config, model = chat_data
    cfg = PresampleConfig(num_prompts=6, samples=4, extra_sample=False, min_correct=2, chunk_size=8,
                          max_new_tokens=4)
    presample(model, tok, data, cfg, tmp_path / "store")
    split = load_rehearsal(tmp_path / "store")
    again = load_prompts(config, tok, reward=first_char_even)
    assert len(ExplorationTask.from_store(again, split).problems_list) == len(split.exploration_index)
    retemplated = chat_tokenizer()
    retemplated.chat_template = retemplated.chat_template.replace("}}\n{{", "}}:{{")  # "user:..." not "user\n..."
    other = load_prompts(config, retemplated, reward=first_char_even)
    assert [p.prompt for p in other.items("train")] == [p.prompt for p in data.items("train")]
    with pytest.raises(DataError, match="encodes to other tokens"):  # same texts, another rendering
        ExplorationTask.from_store(other, split)
    shifted = load_prompts(DataConfig(**{**config.__dict__, "test_fraction": 0.5}), tok, reward=first_char_even)
    with pytest.raises(DataError, match="differ from those the store was pre-sampled from"):
        ExplorationTask.from_store(shifted, split)


def test_num_prompts_zero_needs_a_dataset(tiny_model, tokenizer, tmp_path) -> None:
    with pytest.raises(ConfigError, match="num_prompts = 0"):
        presample(tiny_model, tokenizer, AdditionTask(digits=1), PresampleConfig(num_prompts=0), tmp_path)
    with pytest.raises(ConfigError, match="num_prompts"):
        PresampleConfig(num_prompts=-1)


class FirstCharEven(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


def test_a_lora_policy_presamples_from_its_adapter_disabled_base(tokenizer, tmp_path) -> None:
    base = tiny_causal_lm(tiny_config("tiny"), seed=0)
    plain = copy.deepcopy(base).eval()  # an independent copy of the base model, for checking only
    lora = add_lora(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter: with it switched on the policy is not the base any more
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    task = FirstCharEven(digits=1)
    cfg = PresampleConfig(num_prompts=12, samples=4, extra_sample=False, min_correct=2, chunk_size=6, seed=2)
    owned = {id(p) for p in lora.parameters()}
    foreign: list[str] = []

    def record(module, args, output):
        if any(id(p) not in owned for p in module.parameters()):
            foreign.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        summary = presample(lora, tokenizer, task, cfg, tmp_path / "lora")
    finally:
        handle.remove()
    assert not foreign, f"a second model ran: {sorted(set(foreign))}"
    assert summary["stored_responses"] > 0
    lora.eval()
    differs = 0
    for _, prompt, response, logp in _stored_rows(tmp_path / "lora", 2):
        torch.testing.assert_close(logp, _plain_log_probs(plain, prompt, response), rtol=1e-4, atol=1e-5)
        differs += not torch.allclose(logp, _plain_log_probs(lora, prompt, response), atol=1e-3)
    assert differs > 0  # the adapter-on policy would have given other log-probs
    # the same store as sampling the plain base model: responses, outcomes, log-probs, fingerprint
    presample(plain, tokenizer, task, cfg, tmp_path / "plain")
    for c in range(2):
        a, b = read_shard(shard_path(tmp_path / "lora", c)), read_shard(shard_path(tmp_path / "plain", c))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert model_fingerprint(lora) == model_fingerprint(plain)


def test_the_presample_command_on_a_model_folder_and_a_chat_dataset(chat_data, plugins, tmp_path) -> None:
    from klcore.recipes import run_recipe

    tok, data, config, model = chat_data
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    overrides = [f"model={folder}", f"data.path={config.path}", "data.messages_field=messages",
                 "data.system_prompt=add", "data.test_fraction=0.2", "reward=exact_match", "lora.r=2",
                 "presample.num_prompts=0", "presample.samples=2", "presample.min_correct=1",
                 "presample.extra_sample=false", "presample.max_new_tokens=3", "presample.chunk_size=16"]
    summary = run_recipe(plugins, "dph-presample", out=tmp_path / "run", overrides=overrides)
    train = data.items("train")
    assert summary["prompts"] == len(train)
    manifest = json.loads((tmp_path / "run" / "store" / "manifest.json").read_text())
    assert manifest["prompts"] == [[p.prompt, p.answer] for p in train]
    assert manifest["model_fingerprint"] == model_fingerprint(model)  # the LoRA run sampled the base
    with pytest.raises(ConfigError, match="need a model"):
        run_recipe(plugins, "dph-presample", out=tmp_path / "no-model", overrides=[f"data.path={config.path}"])
