"""klcore.data on real tokenizer shapes: a Qwen-style tokenizer built in code (no BOS, chat template, EOS
as pad) and the toy one (BOS); files written at test time (jsonl, json, parquet, csv), malformed and
over-long rows; rewards and tasks through the registries."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from klcore import Component, hookimpl
from klcore.data import DataConfig, Prompt, encode_prompt, load_prompts, padding_id, score_completions
from klcore.errors import ConfigError, DataError
from klcore.plugins import build_plugin_manager
from klcore.rewards import exact_match, math_verify, reasoning_gym
from klcore.rollout import sample
from klcore.tasks import reasoning_gym_task
from klcore.toy import Problem, char_tokenizer, encode_prompts, tiny_causal_lm, tiny_config
from klcore.toy.tokenizer import chat_tokenizer

ROWS = [{"question": f"{a}+{b}=", "solution": str(a + b)} for a in range(10) for b in range(10)]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _config(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), prompt_field="question", answer_field="solution", **kw)


def test_plain_prompts_without_bos_and_with_chat_template(tmp_path) -> None:
    tok = chat_tokenizer()
    assert tok.bos_token_id is None and tok.pad_token_id == tok.eos_token_id
    ds = load_prompts(_config(_jsonl(tmp_path / "a.jsonl", ROWS), system_prompt="be brief"), tok)
    assert len(ds) == 100
    first = next(p for p in ds.items("train") + ds.items("test") if p.prompt == "3+4=")
    rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(list(first.ids)) == rendered
    assert first.answer == "7" and first.row["question"] == "3+4=" and first.source == "a.jsonl:35"
    # chat off: the text alone, and this tokenizer adds no special token
    plain = load_prompts(_config(tmp_path / "a.jsonl", chat="off"), tok)
    item = next(p for p in plain.items("train") + plain.items("test") if p.prompt == "3+4=")
    assert list(item.ids) == tok.convert_tokens_to_ids(list("3+4="))


def test_toy_tokenizer_keeps_its_bos() -> None:
    tok = char_tokenizer()
    assert encode_prompts(tok, [Problem("12+3=", "15")]) == [[tok.bos_token_id, *tok.convert_tokens_to_ids(list("12+3="))]]


def test_chat_rows_from_parquet_and_the_split_is_by_prompt(tmp_path) -> None:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"messages": [{"role": "user", "content": r["question"]}], "answer": r["solution"]} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    tok = chat_tokenizer()
    ds = load_prompts(DataConfig(path=str(tmp_path / "chat.parquet"), messages_field="messages", test_fraction=0.3), tok)
    test = {p.prompt for p in ds.items("test")}
    assert 10 < len(test) < 50  # about 30 of 100
    expected = tok.apply_chat_template(rows[0]["messages"], add_generation_prompt=True, tokenize=False)
    zero = next(p for p in ds.items("train") + ds.items("test") if p.prompt == "0+0=")
    assert tok.decode(list(zero.ids)) == expected
    # the split does not depend on row order or on the other rows
    pq.write_table(pa.Table.from_pylist(rows[::-1][:60]), tmp_path / "rev.parquet")
    again = load_prompts(DataConfig(path=str(tmp_path / "rev.parquet"), messages_field="messages", test_fraction=0.3), tok)
    assert {p.prompt for p in again.items("test")} == test & {p.prompt for p in again.items("train") + again.items("test")}


def test_chat_rows_need_a_template(tmp_path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [{"m": [{"role": "user", "content": "1+1="}], "answer": "2"}])
    with pytest.raises(ConfigError, match="no chat_template"):
        load_prompts(DataConfig(path=str(path), messages_field="m"), char_tokenizer())


def test_malformed_rows_name_file_and_line(tmp_path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{not json", {"question": "", "solution": "1"}, {"question": "1+1="},
                                           ROWS[1]])
    with pytest.raises(DataError) as err:
        load_prompts(_config(path), chat_tokenizer())
    text = str(err.value)
    assert "3 malformed" in text and "bad.jsonl:2: not JSON" in text and "bad.jsonl:3" in text
    assert "bad.jsonl:4: field 'solution' is missing" in text and "skip_bad_rows" in text
    ds = load_prompts(_config(path, skip_bad_rows=True), chat_tokenizer())
    assert len(ds) == 2 and ds.metrics["data/dropped_bad"] == 3


def test_over_long_rows_are_dropped_and_counted(tmp_path) -> None:
    rows = [*ROWS[:5], {"question": "1+" * 40 + "1=", "solution": "41"}]
    tok = chat_tokenizer()
    ds = load_prompts(_config(_jsonl(tmp_path / "l.jsonl", rows), chat="off", max_prompt_length=10), tok)
    assert len(ds) == 5 and ds.metrics == {"data/dropped_too_long": 1.0, "data/dropped_bad": 0.0}
    assert all(len(p.ids) <= 10 for p in ds.items("train") + ds.items("test"))


def test_json_and_csv_files(tmp_path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"data": ROWS[:8]}))
    with (tmp_path / "a.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["question", "solution"])
        writer.writeheader()
        writer.writerows(ROWS[:8])
    tok = chat_tokenizer()
    a = load_prompts(_config(tmp_path / "a.json"), tok)
    b = load_prompts(_config(tmp_path / "a.csv"), tok)
    key = sorted((p.prompt, p.answer, p.ids) for p in a.items("train") + a.items("test"))
    assert key == sorted((p.prompt, p.answer, p.ids) for p in b.items("train") + b.items("test")) and len(key) == 8
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(_config(tmp_path / "missing.jsonl"), tok)


def test_no_pad_token_pads_with_eos_and_masks_stay_right(tmp_path) -> None:
    tok = chat_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None and padding_id(tok) == tok.eos_token_id
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    ds = load_prompts(_config(_jsonl(tmp_path / "a.jsonl", ROWS[:20]), chat="off"), tok)
    prompts = ds.items("train")[:3]
    roll = sample(model, encode_prompts(tok, prompts), group_size=2, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                  pad_token_id=padding_id(tok), generator=torch.Generator().manual_seed(0))
    for row, mask in zip(roll.responses, roll.response_mask, strict=True):
        stops = (row == tok.eos_token_id).nonzero()
        length = int(stops[0]) + 1 if len(stops) else row.numel()
        assert mask.tolist() == [True] * length + [False] * (row.numel() - length)
    lengths = [len(p.ids) for p in prompts for _ in range(2)]
    prompt_mask = roll.attention_mask[:, : roll.prompt_length]
    assert prompt_mask.sum(1).tolist() == lengths


def test_builtin_rewards() -> None:
    rows = [{"answer": "0.5"}, {"answer": "0.5"}, {"answer": "12"}]
    assert exact_match()(["0.5 ", "1/2", "12"], rows) == [1.0, 0.0, 1.0]
    assert math_verify()(["so \\boxed{\\frac{1}{2}}", "it is 0.6", "The answer is $12$."], rows) == [1.0, 0.0, 1.0]
    with pytest.raises(DataError, match=r"row 1 .*answer"):
        exact_match()(["a", "b"], [{"answer": "a"}, {"solution": "b"}])


def test_reasoning_gym_task_and_reward() -> None:
    rg = pytest.importorskip("reasoning_gym")
    tok = chat_tokenizer()
    task = reasoning_gym_task(tok, DataConfig(chat="off"), dataset="leg_counting", size=20, seed=3)
    items = task.items("train") + task.items("test")
    assert len(items) == 20
    entries = rg.create_dataset("leg_counting", size=20, seed=3)
    by_question = {e["question"]: e for e in entries}
    good = [by_question[p.prompt]["answer"] for p in items]
    assert score_completions(task, items, good) == [1.0] * 20
    assert score_completions(task, items, ["-1"] * 20) == [0.0] * 20
    assert reasoning_gym()([good[0]], [dict(items[0].row)]) == [1.0]


def test_user_reward_errors_name_the_row(tmp_path) -> None:
    def reward(completions, rows):
        return [1.0 if r["solution"] != "3" else "three" for r in rows]

    ds = load_prompts(_config(_jsonl(tmp_path / "a.jsonl", ROWS[:5])), chat_tokenizer(), reward=reward)
    items = ds.items("train") + ds.items("test")
    with pytest.raises(DataError, match=r"a\.jsonl:4"):
        ds.score(items, ["x"] * len(items))


def test_rewards_and_tasks_register_through_hooks() -> None:
    class Plugin:
        @staticmethod
        @hookimpl
        def klcore_register_rewards():
            return [Component("length", lambda: lambda completions, rows: [float(len(c)) for c in completions])]

        @staticmethod
        @hookimpl
        def klcore_register_tasks():
            return [Component("echo", lambda tokenizer=None, data=None: None)]

    plugins = build_plugin_manager(plugins=[("mine", Plugin())], load_entrypoints=False)
    assert {"exact_match", "math_verify", "reasoning_gym", "length"} <= set(plugins.registry("reward"))
    assert {"addition", "reasoning_gym", "echo"} <= set(plugins.registry("task"))
    assert plugins.registry("reward").get_component("length")()(["abc"], [{}]) == [3.0]


def test_prompt_is_a_problem() -> None:
    p = Prompt(prompt="1+1=", answer="2", ids=(5, 6))
    assert isinstance(p, Problem) and encode_prompt(char_tokenizer(), p) == [5, 6]
