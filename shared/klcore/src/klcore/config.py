"""Dataclass configs from TOML and ``--set a.b=value`` overrides.

Configs are dataclasses that validate themselves in ``__post_init__``; nested dataclass fields are
built recursively. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from klcore.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML/JSON literal when it parses (numbers, booleans, arrays, inline
    tables, quoted strings), otherwise the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` override set (nested tables created)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (for example trainer.steps=10), got {item!r}")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {key!r}: {p!r} is a value, not a table")
            node = child
        node[parts[-1]] = parse_value(raw.strip())
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    with p.open("rb") as fh:
        return tomllib.load(fh)


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into dataclass-typed fields."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints.get(name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, where=f"{where + '.' if where else ''}{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad config for {cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts (what ``from_dict`` reads back)."""
    return dataclasses.asdict(config)


__all__ = ["apply_overrides", "from_dict", "load_toml", "parse_value", "to_dict"]
