"""Pre-sampling: stored log-probs against an independent forward pass, selection rules against a
brute-force loop, resume after an interruption, and bad stores."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import divergence_rl.presampling as presample_module
import pytest
import torch
from divergence_rl import PresampleConfig, SelectionRule, load_rehearsal, presample, read_shard
from divergence_rl.store import shard_path

from klcore.errors import CheckpointError, ConfigError, DataError
from klcore.toy import AdditionTask


class FirstCharEven(AdditionTask):
    """Rewarded when the completion's first character has an even code point: about half of a random
    policy's samples pass, so both sets are populated."""

    def verify(self, problem, completion: str) -> float:
        return 1.0 if completion and ord(completion[0]) % 2 == 0 else 0.0


class Never(AdditionTask):
    def verify(self, problem, completion: str) -> float:
        return 0.0


TASK = FirstCharEven(digits=1)


def small_config(**kw) -> PresampleConfig:
    base = dict(num_prompts=12, samples=4, extra_sample=True, min_correct=2, chunk_size=5, seed=3)
    base.update(kw)
    return PresampleConfig(**base)


def _all_shards(root: Path, chunks: int = 3) -> list[dict[str, torch.Tensor]]:
    return [read_shard(shard_path(root, c)) for c in range(chunks)]


def test_stored_responses_are_correct_and_log_probs_match_a_plain_forward(tiny_model, tokenizer, tmp_path) -> None:
    summary = presample(tiny_model, tokenizer, TASK, small_config(), tmp_path)
    assert summary["prompts"] == 12 and summary["shards_written"] == 3
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    prompts = manifest["prompts"]
    tiny_model.eval()
    checked = 0
    for shard in _all_shards(tmp_path):
        pm, rm = shard["prompt_mask"].bool(), shard["response_mask"].bool()
        for i, owner in enumerate(shard["prompt_index"].tolist()):
            prompt, response = shard["prompt_ids"][i][pm[i]], shard["response_ids"][i][rm[i]]
            assert tokenizer.decode(prompt, skip_special_tokens=True) == prompts[owner][0]
            text = tokenizer.decode(response, skip_special_tokens=True)
            assert TASK.verify(None, text) == 1.0
            # independent: one unpadded sequence, full logits, log-softmax, gather
            seq = torch.cat([prompt, response])[None]
            with torch.no_grad():
                logits = tiny_model(input_ids=seq).logits[0, len(prompt) - 1 : -1]
            want = logits.log_softmax(-1).gather(-1, response[:, None]).squeeze(-1)
            torch.testing.assert_close(shard["ref_log_prob"][i][rm[i]], want, rtol=1e-4, atol=1e-5)
            checked += 1
    correct = torch.cat([s["correct"] for s in _all_shards(tmp_path)])
    assert correct.shape == (12, 5)
    assert checked == int((correct.sum(1) > 0).sum()) == summary["stored_responses"] > 0


def _brute_rule(outcomes: tuple[int, ...], samples: int, rule: SelectionRule) -> bool:
    first = outcomes[:samples]
    ok = sum(first) >= rule.min_correct and all(first[: rule.first_correct])
    return ok and (not rule.extra_sample or outcomes[samples] == 1)


@pytest.mark.parametrize("rule", [SelectionRule(3, 0, True), SelectionRule(4, 0, False), SelectionRule(0, 2, False),
                                  SelectionRule(2, 1, True)])
def test_selection_rules_against_a_loop_over_every_outcome(rule: SelectionRule) -> None:
    patterns = list(itertools.product((0, 1), repeat=5))
    got = rule.select(torch.tensor(patterns, dtype=torch.uint8), 4).tolist()
    assert got == [_brute_rule(p, 4, rule) for p in patterns]


def test_split_into_rehearsal_and_exploration(tiny_model, tokenizer, tmp_path) -> None:
    presample(tiny_model, tokenizer, TASK, small_config(), tmp_path)
    correct = torch.cat([s["correct"] for s in _all_shards(tmp_path)])
    prompts = [p for p, _ in json.loads((tmp_path / "manifest.json").read_text())["prompts"]]
    for rule in (None, SelectionRule(0, 1, False), SelectionRule(1, 0, False)):
        data = load_rehearsal(tmp_path, rule)
        used = rule or SelectionRule(2, 0, True)
        want = [prompts[i] for i in range(12) if _brute_rule(tuple(correct[i].tolist()), 4, used)]
        assert [p.prompt for p in data.rehearsal] == want
        assert sorted(p.prompt for p in data.rehearsal + data.exploration) == sorted(prompts)
        assert len(data) == len(want)  # one stored response per rehearsed prompt
        b = data.batch
        assert b["input_ids"].shape[1] == b["attention_mask"].shape[1] == b["position_ids"].shape[1]
        assert b["responses"].shape == b["response_mask"].shape == b["ref_log_prob"].shape
        assert bool(b["response_mask"][:, 0].all())  # right-padded responses start at column 0


def test_resume_after_an_interruption_neither_duplicates_nor_loses(tiny_model, tokenizer, tmp_path, monkeypatch) -> None:
    whole = tmp_path / "whole"
    presample(tiny_model, tokenizer, TASK, small_config(), whole)
    real_save, saved = presample_module.atomic_save, []

    def interrupted(tensors, path, metadata):
        if len(saved) == 1:
            raise KeyboardInterrupt  # killed while sampling the second chunk
        saved.append(path)
        real_save(tensors, path, metadata)

    monkeypatch.setattr(presample_module, "atomic_save", interrupted)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        presample(tiny_model, tokenizer, TASK, small_config(), part)
    assert shard_path(part, 0).exists() and not shard_path(part, 1).exists()
    monkeypatch.setattr(presample_module, "atomic_save", real_save)
    (part / ".tmp-shard-00001.safetensors").write_bytes(b"half-written")  # a leftover of the kill
    summary = presample(tiny_model, tokenizer, TASK, small_config(), part)
    assert (summary["shards_skipped"], summary["shards_written"]) == (1, 2)
    assert not list(part.glob(".tmp-*"))
    for a, b in zip(_all_shards(whole), _all_shards(part), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    owners = torch.cat([s["prompt_index"] for s in _all_shards(part)]).tolist()
    assert len(owners) == len(set(owners))  # no prompt twice
    assert sum(s["correct"].shape[0] for s in _all_shards(part)) == 12  # none lost
    again = presample(tiny_model, tokenizer, TASK, small_config(), part)
    assert (again["shards_skipped"], again["shards_written"]) == (3, 0)


def test_resume_with_other_settings_is_refused(tiny_model, tokenizer, tmp_path) -> None:
    presample(tiny_model, tokenizer, TASK, small_config(), tmp_path)
    with pytest.raises(CheckpointError, match="samples"):
        presample(tiny_model, tokenizer, TASK, small_config(samples=5), tmp_path)


def test_bad_stores(tiny_model, tokenizer, tmp_path) -> None:
    with pytest.raises(DataError, match="missing"):
        load_rehearsal(tmp_path / "nowhere")
    presample(tiny_model, tokenizer, TASK, small_config(), tmp_path / "ok")
    shard_path(tmp_path / "ok", 1).write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="corrupt"):
        load_rehearsal(tmp_path / "ok")
    shard_path(tmp_path / "ok", 1).unlink()
    with pytest.raises(DataError, match="missing"):
        load_rehearsal(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_rehearsal(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps({"format": "divergence-rl/rehearsal", "version": 99}))
    with pytest.raises(DataError, match="version"):
        load_rehearsal(tmp_path / "ok")
    presample(tiny_model, tokenizer, Never(digits=1), small_config(), tmp_path / "empty")
    with pytest.raises(DataError, match="empty"):
        load_rehearsal(tmp_path / "empty")


@pytest.mark.parametrize("kw", [dict(samples=0), dict(min_correct=9), dict(temperature=0.0), dict(chunk_size=True),
                                dict(min_correct=0, extra_sample=False)])
def test_bad_config(kw) -> None:
    with pytest.raises(ConfigError):
        small_config(**kw)
    with pytest.raises(ConfigError):
        SelectionRule(min_correct=-1)


@pytest.mark.parametrize("key", ["rule", "samples", "prompts", "chunk_size", "model_fingerprint"])
def test_manifest_missing_a_key_is_a_data_error_naming_it(tiny_model, tokenizer, tmp_path, key: str) -> None:
    presample(tiny_model, tokenizer, TASK, small_config(), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest[key]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=key):
        load_rehearsal(tmp_path)


def test_manifest_with_an_invalid_rule_is_a_data_error(tiny_model, tokenizer, tmp_path) -> None:
    presample(tiny_model, tokenizer, TASK, small_config(), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["rule"] = {"min_correct": 2, "best_of": 3}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="selection rule"):
        load_rehearsal(tmp_path)


def test_resume_with_another_model_of_the_same_vocabulary_is_refused(tiny_model, tokenizer, tmp_path) -> None:
    from klcore.toy import tiny_causal_lm, tiny_config

    presample(tiny_model, tokenizer, TASK, small_config(), tmp_path)
    other = tiny_causal_lm(tiny_config("tiny"), seed=1)
    assert other.config.vocab_size == tiny_model.config.vocab_size
    with pytest.raises(DataError, match=r"another model.*fresh store"):
        presample(other, tokenizer, TASK, small_config(), tmp_path)
    with torch.no_grad():  # a small update of one weight (a few optimiser steps) is another model too
        next(tiny_model.parameters())[0, 0] += 1e-3
    with pytest.raises(DataError, match="another model"):
        presample(tiny_model, tokenizer, TASK, small_config(), tmp_path)


def test_model_fingerprint_depends_on_the_weights_only() -> None:
    from divergence_rl import model_fingerprint

    from klcore.toy import tiny_causal_lm, tiny_config

    a, b = tiny_causal_lm(tiny_config("tiny"), seed=0), tiny_causal_lm(tiny_config("tiny"), seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)  # same weights, separately built
    b.load_state_dict(tiny_causal_lm(tiny_config("tiny"), seed=2).state_dict())
    assert model_fingerprint(a) != model_fingerprint(b)
