"""Preference pairs (prompt, chosen, rejected): loading (TRL's formats, files or ``datasets``), checks, tokenization.

Token layout of a tokenized pair set (the layout of ``klcore.rollout.Rollout``): prompts left-padded to
a common width P, completions right-padded to a common width R, so ``[prompt | completion]`` rows of
width P + R feed ``klcore.trainer.policy_forward`` directly.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klcore.data import FILE_SUFFIXES, read_rows
from klcore.errors import ConfigError, DataError
from klcore.rollout import left_pad, position_ids

TRUNCATION_MODES = ("truncate", "reject")


@dataclass(frozen=True)
class PreferencePair:
    """One offline comparison: ``chosen`` is preferred to ``rejected`` as a completion of ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    #: rendered by a chat template (which brings its own special tokens: no BOS is added)
    templated: bool = False


def _rows_from_source(source: Any, split: str) -> Iterable[tuple[str, Any]]:
    """``(where, row)`` pairs: a local file through ``klcore.data.read_rows``, a ``datasets`` name or
    folder, a ``DatasetDict`` / dict of splits, or any iterable of rows."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix in FILE_SUFFIXES:
            return read_rows(path)
        try:
            import datasets
        except ImportError as exc:
            raise ConfigError(
                f"loading {str(source)!r} needs the `datasets` package: pip install 'hypo[datasets]', "
                f"or pass a {'/'.join(FILE_SUFFIXES)} file"
            ) from exc
        try:
            ds = datasets.load_dataset(str(source), split=split)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"could not load dataset {str(source)!r} (split {split!r}): {exc}") from exc
        return ((f"{source}[{split}]:{i}", row) for i, row in enumerate(ds))
    if isinstance(source, Mapping) and split in source:  # a datasets.DatasetDict or a plain dict of splits
        source = source[split]
    return ((f"row {i}", row) for i, row in enumerate(source))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def _implicit_prompt(chosen: Any, rejected: Any, where: str) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen, rejected). Conversational: every message
    but the last is the prompt and must be shared. Text: the longest common prefix, cut back to the
    last whitespace in it so that both completions start at a word."""
    if _is_messages(chosen) and _is_messages(rejected):
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise DataError(
                f"{where}: an implicit-prompt conversational pair needs the same messages before the last one in "
                "chosen and rejected (the shared prompt); give an explicit prompt column instead"
            )
        return chosen[:-1], chosen[-1:], rejected[-1:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        cut = max(chosen.rfind(c, 0, n) for c in " \n\t") + 1
        if cut == 0:
            raise DataError(f"{where}: chosen and rejected share no prompt (no common text up to a space)")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError(f"{where}: chosen and rejected must both be text or both be message lists")


def _render(prompt: Any, chosen: Any, rejected: Any, tokenizer: Any, where: str) -> tuple[str, str, str]:
    """Text of a conversational pair through the tokenizer's chat template: the prompt with the
    generation prompt, each completion as what the template appends after it."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{where} is conversational (lists of messages); pass tokenizer= with a chat_template to render it"
        )
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    tails = []
    for role, completion in (("chosen", chosen), ("rejected", rejected)):
        if not _is_messages(completion):
            raise DataError(f"{where}: the prompt is a message list, so {role} must be one too")
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head):
            raise DataError(
                f"{where}: the chat template renders prompt + {role} without the rendered prompt as its prefix, "
                "so the completion cannot be separated; apply the template yourself and pass text"
            )
        tails.append(full[len(head):])
    return head, tails[0], tails[1]


def load_preference_pairs(
    source: Any,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    split: str = "train",
    tokenizer: Any = None,
) -> list[PreferencePair]:
    """Read and check preference pairs in TRL's preference formats.

    ``source``: a ``.jsonl``/``.json`` (array or ``{"data": [...]}``)/``.parquet``/``.csv`` file (a UTF-8
    BOM is fine), a ``datasets`` name or local folder (``load_dataset(source, split=split)``), a
    ``datasets.Dataset`` / ``DatasetDict`` (its ``split``), or any iterable of mappings. Rows are
    explicit (prompt, chosen, rejected) or implicit-prompt (chosen and rejected only, sharing the prompt),
    as text or conversational (lists of ``{"role", "content"}`` messages, rendered with ``tokenizer``'s
    chat template; such pairs are marked ``templated``). Completions must be non-empty and differ; a bad
    row raises ``DataError`` naming the row and the column.
    """
    pairs: list[PreferencePair] = []
    for where, row in _rows_from_source(source, split):
        if isinstance(row, DataError):
            raise DataError(f"{where}: {row}")
        if not isinstance(row, Mapping):
            raise DataError(
                f"{where} is a {type(row).__name__}, expected a mapping of column name to text "
                "(pass a list of dicts, a datasets.Dataset or a .jsonl file)"
            )
        for role, column in (("chosen", chosen_column), ("rejected", rejected_column)):
            if column not in row:
                raise DataError(
                    f"{where} has no column {column!r} (the {role} column); it has {sorted(row)}. "
                    f"Pass {role}_column= with the right name"
                )
        chosen, rejected = row[chosen_column], row[rejected_column]
        if prompt_column in row:
            prompt = row[prompt_column]
        else:
            prompt, chosen, rejected = _implicit_prompt(chosen, rejected, where)
        templated = _is_messages(prompt)
        if templated:
            prompt, chosen, rejected = _render(prompt, chosen, rejected, tokenizer, where)
        values = {}
        for role, column, value in (("prompt", prompt_column, prompt), ("chosen", chosen_column, chosen),
                                    ("rejected", rejected_column, rejected)):
            if not isinstance(value, str):
                raise DataError(
                    f"{where} column {column!r} holds a {type(value).__name__}, expected a string or, for "
                    "conversational data, a list of {'role', 'content'} messages"
                )
            if not value.strip():
                raise DataError(f"{where} column {column!r} ({role}) is an empty string; drop the row or fill it")
            values[role] = value
        if values["chosen"] == values["rejected"]:
            raise DataError(
                f"{where} has identical chosen and rejected completions ({values['chosen'][:40]!r}); "
                "such a pair carries no preference: drop it"
            )
        pairs.append(PreferencePair(**values, templated=templated))
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
        prompt = ([] if pair.templated else bos) + tokenizer.encode(pair.prompt, add_special_tokens=False)
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
