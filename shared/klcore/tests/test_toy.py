"""The embedded toy setup: tokenizer, tasks and verifiers, model configs, warm-up."""

from __future__ import annotations

import pytest
import torch

from klcore.errors import ConfigError
from klcore.toy import (
    CHARACTERS,
    AdditionTask,
    MultiplicationTask,
    Problem,
    SortingTask,
    char_tokenizer,
    get_task,
    tiny_causal_lm,
    tiny_config,
    tiny_moe_config,
    warmup,
)


def test_tokenizer_round_trip_and_specials() -> None:
    tok = char_tokenizer()
    text = "sort:3142>1234, 12+34=46"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 4 + len(CHARACTERS)
    assert tok.decode([*ids[:3], 2, 0], skip_special_tokens=True) == text[:3]


@pytest.mark.parametrize("task", [AdditionTask(digits=3), MultiplicationTask(digits=2), SortingTask(length=5)])
def test_tasks_verify_exactly_and_splits_are_disjoint(task) -> None:
    gen = torch.Generator().manual_seed(0)
    train = task.problems(300, generator=gen, split="train")
    test = task.problems(100, generator=gen, split="test")
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    for p in train[:50]:
        a = p.prompt
        if isinstance(task, SortingTask):
            assert p.answer == "".join(sorted(a[len("sort:") : -1]))
        else:
            x, y = a[:-1].replace("*", "+").split("+")
            assert int(p.answer) == (int(x) + int(y) if isinstance(task, AdditionTask) else int(x) * int(y))
        assert task.verify(p, p.answer) == 1.0 and task.verify(p, f" {p.answer} ") == 1.0
        assert task.verify(p, p.answer + "0") == 0.0 and task.verify(p, "") == 0.0
        assert len(p.answer) <= task.max_answer_chars


def test_get_task_and_bad_options() -> None:
    assert get_task("addition", digits=1).verify(Problem("1+1=", "2"), "2") == 1.0
    with pytest.raises(ConfigError, match="addition"):
        get_task("division")
    with pytest.raises(ConfigError):
        get_task("addition", length=3)
    with pytest.raises(ConfigError):
        AdditionTask(digits=0)
    with pytest.raises(ConfigError):
        AdditionTask().problems(1, generator=torch.Generator(), split="valid")


@pytest.mark.parametrize("config", [tiny_config("tiny"), tiny_config("small"), tiny_moe_config("tiny")])
def test_model_configs_build_and_run(config) -> None:
    model = tiny_causal_lm(config, seed=0)
    out = model(input_ids=torch.tensor([[1, 5, 6, 14]]))
    assert out.logits.shape == (1, 4, len(char_tokenizer()))
    with pytest.raises(ConfigError):
        tiny_config("huge")


def test_warmup_lowers_the_loss(tokenizer) -> None:
    model = tiny_causal_lm(tiny_config("tiny"), seed=0)
    result = warmup(model, tokenizer, AdditionTask(digits=1), steps=60, batch_size=32, lr=1e-2, eval_problems=16)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first
    assert 0.0 <= result.accuracy <= 1.0
