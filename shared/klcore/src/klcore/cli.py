"""The ``klcore`` command: list plugins and recipes, run a recipe."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from klcore.errors import KlcoreError
from klcore.plugins import DISABLE_AUTOLOAD_ENV, KINDS, build_plugin_manager
from klcore.recipes import run_recipe

DESCRIPTION = f"""\
klcore: divergence-based training methods as plugins on one core.

  klcore plugins                      what is installed and what each plugin registers
  klcore recipes                      the runnable recipes
  klcore run grpo-toy                 run a recipe at its default size (writes runs/grpo-toy-<time>/)
  klcore run grpo-toy --out runs/a --set trainer.steps=10 --set warmup_steps=100

Each run folder holds config.json, metrics.jsonl (one line per step), checkpoints/ and
summary.json. Re-run with --set trainer.resume=true and the same --out to continue an
interrupted run. Set {DISABLE_AUTOLOAD_ENV}=1 to ignore installed plugins.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klcore", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("plugins", help="list installed plugins, their components, and plugins that failed to load")
    sub.add_parser("recipes", help="list runnable recipes")
    run = sub.add_parser(
        "run", help="run a recipe",
        description="Run RECIPE. Values come from the recipe's defaults, then --config, then each --set.",
    )
    run.add_argument("recipe", help="recipe name (see `klcore recipes`)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, dotted for nested tables: --set trainer.steps=5 (repeatable)")
    run.add_argument("--config", help="TOML file with config values")
    run.add_argument("--out", help="run folder (default: runs/RECIPE-<timestamp>)")
    return parser


def _plugins_report() -> str:
    plugins = build_plugin_manager()
    lines = []
    for name, dist in sorted(plugins.distributions.items()):
        lines.append(f"{name}  ({dist or 'registered in code'})")
        for kind in KINDS:
            for comp_name, entry in plugins.registry(kind).items():
                if entry.owner == name:
                    lines.append(f"    {kind:<12} {comp_name:<24} {entry.component.help}")
    for f in plugins.failures:
        lines.append(f"{f.plugin}  FAILED at {f.stage}: {f.error}")
    return "\n".join(lines)


def _close_process_group() -> None:
    """A run under ``torch.distributed.run`` / ``accelerate launch`` ends by tearing down its process group
    (trainers leave it up: a recipe may run several)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plugins":
            print(_plugins_report())
        elif args.command == "recipes":
            plugins = build_plugin_manager()
            for name, entry in plugins.registry("recipe").items():
                print(f"{name:<20} {entry.component.help}  [{entry.owner}]")
        else:
            plugins = build_plugin_manager()
            try:
                summary = run_recipe(
                    plugins, args.recipe, out=args.out, config_file=args.config, overrides=args.overrides
                )
            finally:
                _close_process_group()
            print(json.dumps(summary, indent=2))
    except KlcoreError as exc:
        print(f"klcore: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
