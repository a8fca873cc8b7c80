"""Preference pairs (prompt, chosen, rejected): loading from JSONL or ``datasets``, checks, tokenization.

Token layout of a tokenized pair set (the layout of ``klcore.rollout.Rollout``): prompts left-padded to
a common width P, completions right-padded to a common width R, so ``[prompt | completion]`` rows of
width P + R feed ``klcore.trainer.policy_forward`` directly.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klcore.errors import ConfigError, DataError
from klcore.rollout import left_pad, position_ids

TRUNCATION_MODES = ("truncate", "reject")


@dataclass(frozen=True)
class PreferencePair:
    """One offline comparison: ``chosen`` is preferred to ``rejected`` as a completion of ``prompt``."""

    prompt: str
    chosen: str
    rejected: str


def _rows_from_jsonl(path: Path) -> list[Mapping[str, Any]]:
    rows: list[Mapping[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not valid JSON ({exc.msg}); write one JSON object per line") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n} holds a {type(row).__name__}, expected a JSON object per line")
            rows.append(row)
    return rows


def _rows_from_source(source: Any, split: str) -> Iterable[Mapping[str, Any]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix in (".jsonl", ".json"):
            if not path.is_file():
                raise DataError(f"preference file {str(path)!r} does not exist; pass an existing JSONL file")
            return _rows_from_jsonl(path)
        try:
            import datasets
        except ImportError as exc:
            raise ConfigError(
                f"loading {str(source)!r} needs the `datasets` package: pip install 'hypo[datasets]', "
                "or pass a .jsonl file"
            ) from exc
        try:
            return datasets.load_dataset(str(source), split=split)  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"could not load dataset {str(source)!r} (split {split!r}): {exc}") from exc
    if isinstance(source, Mapping) and split in source:  # a datasets.DatasetDict or a plain dict of splits
        return source[split]  # type: ignore[no-any-return]
    return source  # type: ignore[no-any-return]


def load_preference_pairs(
    source: Any,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    split: str = "train",
) -> list[PreferencePair]:
    """Read and check preference pairs.

    ``source``: a ``.jsonl`` path (one JSON object per line), a ``datasets`` name or local folder
    (``load_dataset(source, split=split)``), a ``datasets.Dataset`` / ``DatasetDict`` (its ``split``), or
    any iterable of mappings. Every row needs the three columns as non-empty strings with
    ``chosen != rejected``; a bad row raises ``DataError`` naming the row and the column.
    """
    columns = {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column}
    pairs: list[PreferencePair] = []
    for i, row in enumerate(_rows_from_source(source, split)):
        if not isinstance(row, Mapping):
            raise DataError(
                f"row {i} is a {type(row).__name__}, expected a mapping of column name to text "
                "(pass a list of dicts, a datasets.Dataset or a .jsonl file)"
            )
        values = {}
        for role, column in columns.items():
            if column not in row:
                raise DataError(
                    f"row {i} has no column {column!r} (the {role} column); it has {sorted(row)}. "
                    f"Pass {role}_column= with the right name"
                )
            value = row[column]
            if not isinstance(value, str):
                raise DataError(
                    f"row {i} column {column!r} holds a {type(value).__name__}, expected a string "
                    "(conversational message lists are not supported: apply the chat template first)"
                )
            if not value.strip():
                raise DataError(f"row {i} column {column!r} is an empty string; drop the row or fill it")
            values[role] = value
        if values["chosen"] == values["rejected"]:
            raise DataError(
                f"row {i} has identical chosen and rejected completions ({values['chosen'][:40]!r}); "
                "such a pair carries no preference: drop it"
            )
        pairs.append(PreferencePair(**values))
    if not pairs:
        raise DataError("the preference data holds no rows; pass at least one (prompt, chosen, rejected) row")
    return pairs


def _right_pad(rows: Sequence[Sequence[int]], pad: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


@dataclass
class TokenizedPairs:
    """Tokenized pairs: ``prompt_ids``/``prompt_mask`` ``[n, P]`` (left-padded), ``chosen_ids``,
    ``chosen_mask``, ``rejected_ids``, ``rejected_mask`` ``[n, R]`` (right-padded, masks bool)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor
    pad_token_id: int

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    def prompts(self, index: torch.Tensor) -> list[list[int]]:
        """Token ids of the prompts at ``index`` without padding (what ``klcore.rollout.sample`` takes)."""
        return [self.prompt_ids[i][self.prompt_mask[i].bool()].tolist() for i in index.tolist()]

    def sequences(self, index: torch.Tensor, which: str) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids`` ``[b, P + R]``, ``responses`` and
        ``response_mask`` ``[b, R]`` of the ``which`` (``chosen`` / ``rejected``) completions at ``index``."""
        responses = getattr(self, f"{which}_ids")[index]
        response_mask = getattr(self, f"{which}_mask")[index]
        attention = torch.cat([self.prompt_mask[index].long(), response_mask.long()], dim=1)
        return {
            "input_ids": torch.cat([self.prompt_ids[index], responses], dim=1),
            "attention_mask": attention,
            "position_ids": position_ids(attention),
            "responses": responses,
            "response_mask": response_mask,
        }

    def fingerprint(self) -> str:
        """sha256 of every token id and mask: equal data gives an equal fingerprint."""
        h = hashlib.sha256()
        for t in (self.prompt_ids, self.prompt_mask, self.chosen_ids, self.chosen_mask, self.rejected_ids,
                  self.rejected_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int = 1024,
    truncation: str = "truncate",
    add_bos: bool = True,
) -> TokenizedPairs:
    """Tokenize ``pairs``: ``[bos] prompt`` and ``completion <eos>`` (no other special tokens).

    A prompt plus completion longer than ``max_length`` tokens is cut at the end of the completion
    with a warning (``truncation="truncate"``, TRL's ``keep_start``) or raises ``DataError``
    (``"reject"``). A prompt that leaves no room for a completion token always raises.
    """
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an int >= 2, got {max_length!r}")
    if not pairs:
        raise DataError("no preference pairs to tokenize")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer needs an eos_token_id and a pad_token_id (set tokenizer.pad_token)")
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    prompts, chosen, rejected, cut = [], [], [], 0
    for i, pair in enumerate(pairs):
        prompt = bos + tokenizer.encode(pair.prompt, add_special_tokens=False)
        room = max_length - len(prompt)
        if room < 1:
            raise DataError(
                f"pair {i}: the prompt alone has {len(prompt)} tokens, max_length is {max_length}; "
                "raise max_length or shorten the prompt"
            )
        completions = []
        for role, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
            if len(ids) > room:
                if truncation == "reject":
                    raise DataError(
                        f"pair {i}: prompt + {role} completion have {len(prompt) + len(ids)} tokens, more than "
                        f"max_length = {max_length}; raise max_length or use truncation='truncate'"
                    )
                ids, cut = ids[:room], cut + 1
            completions.append(ids)
        if completions[0] == completions[1]:
            raise DataError(f"pair {i}: chosen and rejected are identical after tokenization and truncation")
        prompts.append(prompt)
        chosen.append(completions[0])
        rejected.append(completions[1])
    if cut:
        warnings.warn(
            f"{cut} completion(s) truncated to fit max_length = {max_length} (they lose their EOS)", stacklevel=2
        )
    pad = int(tokenizer.pad_token_id)
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    width = max(len(r) for r in (*chosen, *rejected))
    chosen_ids, chosen_mask = _right_pad(chosen, pad, width)
    rejected_ids, rejected_mask = _right_pad(rejected, pad, width)
    return TokenizedPairs(prompt_ids, prompt_mask.bool(), chosen_ids, chosen_mask, rejected_ids, rejected_mask, pad)


__all__ = ["TRUNCATION_MODES", "PreferencePair", "TokenizedPairs", "load_preference_pairs", "tokenize_pairs"]
