"""Built-in rewards: ``exact_match``, ``math_verify`` and ``reasoning_gym``.

A reward is built by a factory registered through ``klcore_register_rewards`` (``factory(**options)``)
and called as ``reward(completions, rows) -> [float, ...]``: ``completions`` the decoded responses,
``rows`` the dataset rows they answer (their fields, ``answer`` holding the ``data.answer_field`` value).
The built-ins score row by row and name the row whose scoring failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from klcore.data import RewardFn, describe_row
from klcore.errors import ConfigError, DataError


def _per_row(name: str, score: Callable[[str, Mapping[str, Any]], float]) -> RewardFn:
    def reward(completions: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[float]:
        out = []
        for i, (completion, row) in enumerate(zip(completions, rows, strict=True)):
            try:
                out.append(float(score(completion, row)))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"reward {name!r} failed on row {i} ({describe_row(row)}): {exc}") from exc
        return out

    reward.__name__ = name
    return reward


def exact_match(*, field: str = "answer", strip: bool = True) -> RewardFn:
    """1.0 when the completion equals ``row[field]`` (both stripped of surrounding space by default)."""

    def score(completion: str, row: Mapping[str, Any]) -> float:
        gold = str(row[field])
        return float(completion.strip() == gold.strip() if strip else completion == gold)

    return _per_row("exact_match", score)


def math_verify(*, field: str = "answer") -> RewardFn:
    """1.0 when the completion's final answer (``\\boxed{}``, LaTeX or a plain expression, extracted by the
    ``math-verify`` library) equals ``row[field]`` symbolically. Needs ``klcore[math]``."""
    try:
        import math_verify as mv
    except ImportError as exc:
        raise ConfigError("reward 'math_verify' needs the math-verify library: pip install 'klcore[math]'") from exc

    def score(completion: str, row: Mapping[str, Any]) -> float:
        gold_text = str(row[field])
        gold = mv.parse(gold_text) or mv.parse(f"${gold_text}$")
        if not gold:
            raise ValueError(f"math-verify finds no answer in the reference {gold_text!r}")
        return float(mv.verify(gold, mv.parse(completion)))

    return _per_row("math_verify", score)


def reasoning_gym(*, dataset: str = "") -> RewardFn:
    """Score with a ``reasoning_gym`` dataset's own ``score_answer``: the row is the generated entry
    (``question``, ``answer``, ``metadata``); its ``metadata.source_dataset`` names the dataset, or
    ``dataset`` does. Needs ``klcore[reasoning-gym]``."""
    try:
        import reasoning_gym as rg
    except ImportError as exc:
        raise ConfigError("reward 'reasoning_gym' needs reasoning-gym: pip install 'klcore[reasoning-gym]'") from exc
    scorers: dict[str, Callable[..., float]] = {}

    def score(completion: str, row: Mapping[str, Any]) -> float:
        meta = row.get("metadata")
        name = (meta.get("source_dataset") if isinstance(meta, Mapping) else None) or dataset
        if not name:
            raise ValueError("the row has no metadata.source_dataset; set the reward's dataset option")
        if name not in scorers:
            scorers[name] = rg.get_score_answer_fn(name)
        return scorers[name](answer=completion, entry=dict(row))

    return _per_row("reasoning_gym", score)


BUILTIN_REWARDS: dict[str, tuple[Callable[..., RewardFn], str]] = {
    "exact_match": (exact_match, "1.0 when the completion equals the row's answer"),
    "math_verify": (math_verify, "symbolic final-answer match (\\boxed{}, LaTeX) by math-verify [klcore[math]]"),
    "reasoning_gym": (reasoning_gym, "a reasoning_gym dataset's own score_answer [klcore[reasoning-gym]]"),
}

__all__ = ["BUILTIN_REWARDS", "exact_match", "math_verify", "reasoning_gym"]
