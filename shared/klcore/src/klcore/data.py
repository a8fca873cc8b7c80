"""Prompt datasets for the LM trainers: local files or a ``datasets`` name, any tokenizer.

``load_prompts(DataConfig(...), tokenizer)`` reads rows from a ``.jsonl``/``.json``/``.parquet``/``.csv``
file or from ``datasets.load_dataset(path, name, split=...)``, takes the prompt from ``prompt_field``
(plain text) or ``messages_field`` (a chat: a list of ``{"role", "content"}``), the reference answer
from ``answer_field``, and encodes each prompt once:

* with the tokenizer's chat template (``apply_chat_template(..., add_generation_prompt=True)``, the
  optional ``system_prompt`` first) when the tokenizer has one and ``chat`` is ``auto`` or ``on``;
* as plain text otherwise, with whatever special tokens the tokenizer itself adds (a BOS for Llama,
  nothing for Qwen): klcore assumes no BOS.

Rows go to ``train`` or ``test`` by a hash of their prompt (deterministic, independent of row order, and
repeated prompts never straddle the split). Rows whose prompt is longer than ``max_prompt_length``
tokens are dropped and counted (``data/dropped_too_long``), never truncated. Malformed rows raise a
``DataError`` naming the file and row number, or with ``skip_bad_rows`` are dropped and counted
(``data/dropped_bad``).

The result, :class:`PromptDataset`, is a task (``problems`` / ``verify``, see ``klcore.toy.Task``)
whose problems are :class:`Prompt` records, so every trainer that samples from a task trains on it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klcore.errors import ConfigError, DataError
from klcore.toy.tasks import SPLITS, Problem

#: Reward functions: ``(completions, rows) -> one float per completion`` (see ``klcore.rewards``).
RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], Sequence[float]]
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
CHAT_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Prompt(Problem):
    """A dataset row as a problem: ``prompt`` (text, or the chat's last user turn), ``answer`` ("" when the
    data has none), ``ids`` (the encoded prompt), ``row`` (the row's fields, ``answer`` among them, for
    rewards) and ``source`` (``file:row`` for messages)."""

    ids: tuple[int, ...] = ()
    row: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    source: str = ""


@dataclass
class DataConfig:
    """Where the prompts come from and how rows map to prompts (see the module docstring).

    ``path``: a local file (by suffix) or a ``datasets`` name (``name`` its configuration, ``split`` the
    split read). ``test_fraction`` of the prompts (by hash) form the held-out ``test`` split.
    ``max_prompt_length = 0`` keeps every row; ``limit = 0`` reads every row.
    """

    path: str = ""
    name: str = ""
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    messages_field: str = ""
    system_prompt: str = ""
    chat: str = "auto"
    test_fraction: float = 0.1
    max_prompt_length: int = 0
    limit: int = 0
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if self.chat not in CHAT_MODES:
            raise ConfigError(f"data.chat must be one of {CHAT_MODES}, got {self.chat!r}")
        if not 0.0 <= float(self.test_fraction) < 1.0:
            raise ConfigError(f"data.test_fraction must be in [0, 1), got {self.test_fraction}")
        for name in ("max_prompt_length", "limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"data.{name} must be an int >= 0 (0: no limit), got {value!r}")
        if not self.prompt_field and not self.messages_field:
            raise ConfigError("set data.prompt_field (plain-text prompts) or data.messages_field (chat rows)")


def padding_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token (masks mark what is padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token; set tokenizer.eos_token")
    return int(pad)


def encode_prompt(tokenizer: Any, problem: Problem, *, chat: str = "off") -> list[int]:
    """Token ids of a problem's prompt: ``Prompt.ids`` when already encoded; otherwise its text through the
    chat template (``chat`` ``on``, or ``auto`` with a template) or as plain text with the tokenizer's own
    special tokens."""
    if isinstance(problem, Prompt) and problem.ids:
        return list(problem.ids)
    messages = [{"role": "user", "content": problem.prompt}]
    return _encode(tokenizer, problem.prompt, messages, chat)


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer: Any, text: str, messages: list[dict[str, str]] | None, chat: str) -> list[int]:
    use_chat = chat == "on" or (chat == "auto" and _has_template(tokenizer))
    if use_chat:
        if not _has_template(tokenizer):
            raise ConfigError(f"data.chat = 'on' but {type(tokenizer).__name__} has no chat_template")
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


class PromptDataset:
    """Prompts split into ``train`` / ``test``, drawn like a toy task's problems and scored by a reward.

    ``problems(n, generator=, split=)`` draws ``n`` prompts uniformly with replacement (a step's batch);
    ``items(split)`` lists a split in file order (evaluation); ``score(problems, completions)`` calls the
    reward once for the batch; ``metrics`` holds the counts of dropped rows (``data/*``).
    """

    def __init__(self, prompts: Mapping[str, list[Prompt]], *, name: str = "prompts", reward: RewardFn | None = None,
                 dropped: Mapping[str, int] | None = None) -> None:
        self.name = name
        self._splits = {s: list(prompts.get(s, [])) for s in SPLITS}
        self.reward = reward
        self.metrics = {f"data/{k}": float(v) for k, v in (dropped or {}).items()}

    def __len__(self) -> int:
        return sum(len(v) for v in self._splits.values())

    @property
    def max_answer_chars(self) -> int:
        return max((len(p.answer) for v in self._splits.values() for p in v), default=0)

    def items(self, split: str = "test") -> list[Prompt]:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self._splits[split])

    def problems(self, n: int, *, generator: torch.Generator, split: str = "train") -> list[Prompt]:
        pool = self.items(split)
        if not pool:
            raise DataError(f"the {split!r} split of {self.name!r} holds no prompt; lower data.test_fraction "
                            "or add rows")
        picks = torch.randint(len(pool), (n,), generator=generator).tolist()
        return [pool[i] for i in picks]

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        """The reward of each completion, checked: one float each. A reward that fails, or returns
        something other than a number, is reported with the row (``file:row``) it failed on."""
        if self.reward is None:
            raise ConfigError(f"{self.name!r} has no reward; pass reward= (see klcore.rewards)")
        rows = [dict(p.row) if isinstance(p, Prompt) else {"prompt": p.prompt, "answer": p.answer} for p in problems]
        try:
            values = list(self.reward(list(completions), rows))
            if len(values) != len(completions):
                raise DataError(f"the reward returned {len(values)} values for {len(completions)} completions")
            return [_number(v) for v in values]
        except (DataError, TypeError, ValueError, KeyError):
            for i in range(len(rows)):  # the batch failed: find the first row that fails alone
                try:
                    (value,) = self.reward([completions[i]], [rows[i]])
                    _number(value)
                except Exception as row_exc:
                    where = getattr(problems[i], "source", "") or f"row {i}"
                    raise DataError(f"the reward failed on {where} ({describe_row(rows[i])}): {row_exc}") from row_exc
            raise

    def verify(self, problem: Problem, completion: str) -> float:
        return self.score([problem], [completion])[0]


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"a reward must return one float per completion, got {value!r}")
    return float(value)


def describe_row(row: Mapping[str, Any]) -> str:
    """The first fields of a row, shortened, for error messages."""
    return ", ".join(f"{k}={str(v)[:40]!r}" for k, v in list(row.items())[:3])


def score_completions(task: Any, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
    """Rewards of ``completions`` for ``problems``: the task's batch ``score`` when it has one, else its
    ``verify`` per completion."""
    if hasattr(task, "score"):
        return list(task.score(problems, completions))
    return [float(task.verify(p, c)) for p, c in zip(problems, completions, strict=True)]


def load_prompts(config: DataConfig, tokenizer: Any, *, reward: RewardFn | None = None) -> PromptDataset:
    """Read, validate, encode and split the rows ``config`` names (see the module docstring)."""
    if not config.path:
        raise ConfigError("data.path is empty: name a .jsonl/.json/.parquet/.csv file or a `datasets` dataset")
    return prompts_from_rows(_read_rows(config), config, tokenizer, reward=reward, name=Path(config.path).stem)


def prompts_from_rows(rows: Iterator[tuple[str, Any]] | Sequence[tuple[str, Any]], config: DataConfig, tokenizer: Any,
                      *, reward: RewardFn | None = None, name: str = "prompts") -> PromptDataset:
    """A :class:`PromptDataset` from ``(source, row)`` pairs (what ``load_prompts`` reads from a file)."""
    splits: dict[str, list[Prompt]] = {s: [] for s in SPLITS}
    bad: list[str] = []
    too_long = 0
    for count, (source, row) in enumerate(rows):
        if config.limit and count >= config.limit:
            break
        try:
            text, messages, answer = _fields(row, config)
        except DataError as exc:
            bad.append(f"{source}: {exc}")
            continue
        ids = _encode(tokenizer, text, messages, _chat_mode(config) if messages is not None else "off")
        if config.max_prompt_length and len(ids) > config.max_prompt_length:
            too_long += 1
            continue
        fields = {**row, "answer": answer}
        splits[_split_of(text if messages is None else json.dumps(messages), config.test_fraction)].append(
            Prompt(prompt=text, answer=answer, ids=tuple(ids), row=fields, source=source))
    if bad and not config.skip_bad_rows:
        shown = "; ".join(bad[:5]) + (f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} malformed row(s): {shown}. Fix them, or set data.skip_bad_rows=true to drop "
                        "and count them")
    if not any(splits.values()):
        raise DataError(f"no usable prompt in {config.path or name!r} ({too_long} over max_prompt_length = "
                        f"{config.max_prompt_length}, {len(bad)} malformed)")
    return PromptDataset(splits, name=name, reward=reward, dropped={"dropped_too_long": too_long,
                                                                   "dropped_bad": len(bad)})


def _fields(row: Any, config: DataConfig) -> tuple[str, list[dict[str, str]] | None, str]:
    """``(prompt text, chat messages or None, answer)`` of one row; ``DataError`` says what is wrong."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, Mapping):
        raise DataError(f"expected an object with fields, got {type(row).__name__}")
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    if config.messages_field:
        msgs = row.get(config.messages_field)
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise DataError(f"field {config.messages_field!r} must be a non-empty list of {{role, content}} strings, "
                            f"got {msgs!r:.80}")
        messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if system and messages[0]["role"] != "system":
            messages = system + messages
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    else:
        text = row.get(config.prompt_field)
        if not isinstance(text, str) or not text.strip():
            have = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(f"field {config.prompt_field!r} must be a non-empty string (fields: {have})")
        messages = [*system, {"role": "user", "content": text}]
    answer = ""
    if config.answer_field:
        if config.answer_field not in row or row[config.answer_field] is None:
            raise DataError(f"field {config.answer_field!r} is missing (set data.answer_field='' for rows without one)")
        answer = str(row[config.answer_field])
    return text, messages if config.chat != "off" else None, answer


def _chat_mode(config: DataConfig) -> str:
    """Chat rows need the template (a plain rendering would drop their earlier turns) unless chat is off."""
    return "on" if config.messages_field and config.chat != "off" else config.chat


def _split_of(key: str, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def _read_rows(config: DataConfig) -> Iterator[tuple[str, Any]]:
    path = Path(config.path)
    if path.suffix in FILE_SUFFIXES or path.is_file():
        return read_rows(path)
    return _hub(config)


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, ``where``
    being ``file:line`` (``file:index`` for JSON arrays and parquet). Text files may start with a UTF-8
    BOM. A JSONL line that is not JSON yields a ``DataError`` as its row, for the caller to report."""
    file = Path(path)
    readers = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _csv}
    if file.suffix not in readers:
        raise DataError(f"{str(file)!r}: unknown file type; use one of {', '.join(FILE_SUFFIXES)}")
    if not file.is_file():
        raise DataError(f"data file {str(file)!r} does not exist")
    return readers[file.suffix](file)


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = DataError(f"not JSON ({exc.msg})")  # reported by _fields with its row number
            yield f"{path.name}:{number}", row


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a list of rows (or {{\"data\": [...]}}), got {type(data).__name__}")
    for number, row in enumerate(data):
        yield f"{path.name}:{number}", row


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("reading parquet needs pyarrow: pip install 'klcore[data]'") from exc
    for number, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path.name}:{number}", row


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for number, row in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
            yield f"{path.name}:{number}", row


def _hub(config: DataConfig) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(f"{config.path!r} is not a local file, and loading a dataset by name needs `datasets`: "
                          "pip install 'klcore[data]'") from exc
    ds = datasets.load_dataset(config.path, config.name or None, split=config.split)
    for number, row in enumerate(ds):
        yield f"{config.path}[{config.split}]:{number}", row


__all__ = [
    "CHAT_MODES",
    "FILE_SUFFIXES",
    "DataConfig",
    "Prompt",
    "PromptDataset",
    "RewardFn",
    "encode_prompt",
    "load_prompts",
    "padding_id",
    "prompts_from_rows",
    "read_rows",
    "score_completions",
]
