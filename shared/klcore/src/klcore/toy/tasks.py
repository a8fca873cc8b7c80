"""Small verifiable tasks with exact-match verifiers.

Each task draws problems from a ``torch.Generator`` and splits its problem space deterministically
into ``train`` (about 80%) and ``test`` (about 20%) by a fixed hash of the operands, so held-out
evaluation never sees a training problem. The families differ in format and skill, so a policy
trained on one can be checked on another (in-domain versus out-of-domain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from klcore.errors import ConfigError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """A prompt (text the model continues) and its one correct completion."""

    prompt: str
    answer: str


class Task(Protocol):
    name: str

    @property
    def max_answer_chars(self) -> int:
        """Longest correct completion, in characters (tokens) without EOS."""

    def problems(self, n: int, *, generator: torch.Generator, split: str = "train") -> list[Problem]:
        """``n`` problems drawn from ``split``."""

    def verify(self, problem: Problem, completion: str) -> float:
        """1.0 when ``completion`` (text before EOS) is the answer, else 0.0."""


def _in_split(key: tuple[int, ...], split: str) -> bool:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    h = 0
    for k in key:
        h = (h * 1_000_003 + k * 7919 + 17) % 1_000_000_007
    return (h % 5 == 0) == (split == "test")


def _exact(problem: Problem, completion: str) -> float:
    return 1.0 if completion.strip() == problem.answer else 0.0


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


@dataclass(frozen=True)
class AdditionTask:
    """``"a+b="`` -> ``"a+b"`` with a, b uniform over ``digits``-digit numbers (leading zeros dropped)."""

    digits: int = 2
    name: str = "addition"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise ConfigError(f"digits must be in 1..9, got {self.digits}")

    @property
    def max_answer_chars(self) -> int:
        return self.digits + 1

    def problems(self, n: int, *, generator: torch.Generator, split: str = "train") -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            a, b = _randint(10**self.digits, generator), _randint(10**self.digits, generator)
            if _in_split((a, b), split):
                out.append(Problem(f"{a}+{b}=", str(a + b)))
        return out

    def verify(self, problem: Problem, completion: str) -> float:
        return _exact(problem, completion)


@dataclass(frozen=True)
class MultiplicationTask:
    """``"a*b="`` -> ``"a*b"`` with a of ``digits`` digits and b a single digit."""

    digits: int = 2
    name: str = "multiplication"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise ConfigError(f"digits must be in 1..9, got {self.digits}")

    @property
    def max_answer_chars(self) -> int:
        return self.digits + 1

    def problems(self, n: int, *, generator: torch.Generator, split: str = "train") -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            a, b = _randint(10**self.digits, generator), _randint(10, generator)
            if _in_split((a, b, 1), split):
                out.append(Problem(f"{a}*{b}=", str(a * b)))
        return out

    def verify(self, problem: Problem, completion: str) -> float:
        return _exact(problem, completion)


@dataclass(frozen=True)
class SortingTask:
    """``"sort:3142>"`` -> ``"1234"``: the ``length`` digits in ascending order."""

    length: int = 4
    name: str = "sorting"

    def __post_init__(self) -> None:
        if not 2 <= self.length <= 16:
            raise ConfigError(f"length must be in 2..16, got {self.length}")

    @property
    def max_answer_chars(self) -> int:
        return self.length

    def problems(self, n: int, *, generator: torch.Generator, split: str = "train") -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            seq = [_randint(10, generator) for _ in range(self.length)]
            if _in_split((*seq, 2), split):
                out.append(Problem("sort:" + "".join(map(str, seq)) + ">", "".join(map(str, sorted(seq)))))
        return out

    def verify(self, problem: Problem, completion: str) -> float:
        return _exact(problem, completion)


TASKS: dict[str, type] = {"addition": AdditionTask, "multiplication": MultiplicationTask, "sorting": SortingTask}


def get_task(name: str, **options: int) -> Task:
    """The task family ``name`` built with ``options`` (``digits=`` or ``length=``)."""
    if name not in TASKS:
        raise ConfigError(f"unknown toy task {name!r}; choose one of {', '.join(TASKS)}")
    try:
        task: Task = TASKS[name](**options)
    except TypeError as exc:
        raise ConfigError(f"bad options {options} for toy task {name!r}: {exc}") from exc
    return task
