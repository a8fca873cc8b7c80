"""Recipes: named, configurable pipelines that ``klcore run NAME`` executes in a run folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klcore.config import apply_overrides, from_dict, load_toml, to_dict
from klcore.plugins import Plugins


@dataclass(frozen=True)
class Recipe:
    """``run(config, run_dir) -> summary`` with ``config`` an instance of ``config_class``.

    The summary (JSON-serialisable) is printed and written to ``RUN/summary.json``.
    """

    name: str
    help: str
    config_class: type
    run: Callable[[Any, Path], dict[str, Any]]


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_config(recipe: Recipe, *, config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """The recipe's config: defaults, then the TOML file's values, then ``--set`` overrides."""
    data = to_dict(recipe.config_class())
    if config_file:
        _deep_update(data, load_toml(config_file))
    return from_dict(recipe.config_class, apply_overrides(data, overrides), where=recipe.name)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def run_recipe(
    plugins: Plugins,
    name: str,
    *,
    out: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Look up recipe ``name``, build its config, run it in ``out`` and write ``summary.json``."""
    recipe: Recipe = plugins.registry("recipe").get_component(name)
    config = build_config(recipe, config_file=config_file, overrides=overrides)
    run_dir = Path(out) if out else default_run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps({"recipe": name, "config": to_dict(config)}, indent=2) + "\n")
    summary = recipe.run(config, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["Recipe", "build_config", "default_run_dir", "run_recipe"]
