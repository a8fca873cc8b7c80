"""Loading, checking and tokenizing preference pairs; every bad row raises a klcore error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypo.data import PreferencePair, load_preference_pairs, tokenize_pairs

from klcore.errors import ConfigError, DataError
from klcore.toy import char_tokenizer

ROWS = [
    {"q": "1+2=", "good": "3", "bad": "4"},
    {"q": "10+5=", "good": "15", "bad": "51"},
]


def _jsonl(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_custom_columns(tmp_path: Path) -> None:
    pairs = load_preference_pairs(_jsonl(tmp_path, ROWS), prompt_column="q", chosen_column="good", rejected_column="bad")
    assert pairs == [PreferencePair("1+2=", "3", "4"), PreferencePair("10+5=", "15", "51")]


def test_datasets_dataset_and_dict() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert load_preference_pairs(ds) == [PreferencePair("a", "b", "c")]
    dd = datasets.DatasetDict({"test": ds})
    assert load_preference_pairs(dd, split="test") == [PreferencePair("a", "b", "c")]


def test_local_dataset_folder(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    folder = tmp_path / "prefs"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"}) + "\n")
    assert load_preference_pairs(str(folder)) == [PreferencePair("x", "y", "z")]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "a", "chosen": "b"}, "no column 'rejected'"),
        ({"prompt": "a", "chosen": "  ", "rejected": "c"}, "empty string"),
        ({"prompt": "a", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, "expected a string"),
    ],
)
def test_bad_rows(row: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_preference_pairs([{"prompt": "ok", "chosen": "1", "rejected": "2"}, row])


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_preference_pairs(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        load_preference_pairs(bad)
    with pytest.raises(DataError, match="no rows"):
        load_preference_pairs([])
    with pytest.raises(DataError, match="expected a mapping"):
        load_preference_pairs({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})


def test_tokenized_layout_matches_manual_encoding() -> None:
    tok = char_tokenizer()
    pairs = [PreferencePair("1+2=", "3", "45"), PreferencePair("10+5=", "15", "5")]
    data = tokenize_pairs(pairs, tok, max_length=32)
    vocab = tok.get_vocab()
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert data.prompt_ids.tolist() == [
        [pad, bos, vocab["1"], vocab["+"], vocab["2"], vocab["="]],
        [bos, vocab["1"], vocab["0"], vocab["+"], vocab["5"], vocab["="]],
    ]
    assert data.chosen_ids.tolist() == [[vocab["3"], eos, pad], [vocab["1"], vocab["5"], eos]]
    assert data.rejected_mask.tolist() == [[True, True, True], [True, True, False]]
    seqs = data.sequences(torch.tensor([0]), "rejected")
    assert seqs["input_ids"].tolist() == [[pad, bos, vocab["1"], vocab["+"], vocab["2"], vocab["="], vocab["4"],
                                           vocab["5"], eos]]
    assert seqs["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert data.prompts(torch.tensor([0])) == [[bos, vocab["1"], vocab["+"], vocab["2"], vocab["="]]]


def test_too_long_truncates_with_warning_or_rejects() -> None:
    tok = char_tokenizer()
    pairs = [PreferencePair("12=", "123456", "9")]  # prompt 4 tokens, chosen 7
    with pytest.warns(UserWarning, match="1 completion"):
        data = tokenize_pairs(pairs, tok, max_length=8)
    assert int(data.chosen_mask.sum()) == 4 and eos_free(data.chosen_ids[0], tok.eos_token_id)
    with pytest.raises(DataError, match="max_length = 8"):
        tokenize_pairs(pairs, tok, max_length=8, truncation="reject")
    with pytest.raises(DataError, match="prompt alone"):
        tokenize_pairs(pairs, tok, max_length=4)
    with pytest.raises(DataError, match="identical after"):
        tokenize_pairs([PreferencePair("12=", "aab", "aac")], tok, max_length=6)
    with pytest.raises(ConfigError, match="truncation"):
        tokenize_pairs(pairs, tok, truncation="drop")


def eos_free(ids: torch.Tensor, eos: int) -> bool:
    return not bool((ids == eos).any())


def test_fingerprint_changes_with_data() -> None:
    tok = char_tokenizer()
    a = tokenize_pairs([PreferencePair("1=", "1", "2")], tok)
    b = tokenize_pairs([PreferencePair("1=", "1", "3")], tok)
    assert a.fingerprint() == tokenize_pairs([PreferencePair("1=", "1", "2")], tok).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_json_array_with_a_bom_and_a_parquet_file(tmp_path: Path) -> None:
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    path = tmp_path / "pairs.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())  # what Windows editors write
    want = [PreferencePair("1+2=", "3", "4"), PreferencePair("2+2=", "4", "5")]
    assert load_preference_pairs(path) == want
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert load_preference_pairs(jsonl) == want
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    assert load_preference_pairs(tmp_path / "pairs.parquet") == want


def test_implicit_prompt_text_rows_share_the_prompt_up_to_a_word() -> None:
    rows = [{"chosen": "Question: two plus two? Answer: four", "rejected": "Question: two plus two? Answer: five"}]
    (pair,) = load_preference_pairs(rows)
    assert pair == PreferencePair("Question: two plus two? Answer: ", "four", "five")
    with pytest.raises(DataError, match="share no prompt"):
        load_preference_pairs([{"chosen": "yes", "rejected": "no"}])


def _chat_rendering(messages, generation_prompt: bool) -> str:
    """The toy template's rendering, written out by hand to check the loader against."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def test_conversational_rows_explicit_and_implicit_through_the_chat_template() -> None:
    from klcore.toy.tokenizer import chat_tokenizer

    tok = chat_tokenizer()
    prompt = [{"role": "user", "content": "1+2?"}]
    good, bad = [{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "4"}]
    explicit = load_preference_pairs([{"prompt": prompt, "chosen": good, "rejected": bad}], tokenizer=tok)
    implicit = load_preference_pairs([{"chosen": prompt + good, "rejected": prompt + bad}], tokenizer=tok)
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert head == _chat_rendering(prompt, True)
    want = PreferencePair(head, "3<|im_end|>\n", "4<|im_end|>\n", templated=True)
    assert explicit == implicit == [want]
    data = tokenize_pairs(explicit, tok)
    row = data.prompts(torch.arange(1))[0]
    assert row == tok(head, add_special_tokens=False)["input_ids"]  # no BOS: the template brings its tokens
    assert data.chosen_ids[0, data.chosen_mask[0]].tolist() == [*tok.encode("3<|im_end|>\n"), tok.eos_token_id]
    with pytest.raises(ConfigError, match="chat_template"):
        load_preference_pairs([{"prompt": prompt, "chosen": good, "rejected": bad}])
    with pytest.raises(DataError, match="same messages"):
        load_preference_pairs([{"chosen": prompt + good, "rejected": [{"role": "user", "content": "x"}, *bad]}],
                              tokenizer=tok)
    with pytest.raises(DataError, match="must be one too"):
        load_preference_pairs([{"prompt": prompt, "chosen": "3", "rejected": bad}], tokenizer=tok)
