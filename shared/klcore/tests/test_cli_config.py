"""The klcore command, recipes and config overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from klcore.cli import main
from klcore.config import apply_overrides, from_dict, parse_value
from klcore.errors import ConfigError

TINY = ["--set", "model_size=tiny", "--set", "warmup_steps=3", "--set", "warmup_batch_size=4",
        "--set", "trainer.steps=2", "--set", "trainer.prompts_per_step=2", "--set", "trainer.group_size=2",
        "--set", "trainer.eval_problems=4", "--set", "trainer.progress=false"]


def test_plugins_and_recipes_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "klcore  (klcore)" in out and "vanilla" in out and "grpo-toy" in out
    assert main(["recipes"]) == 0
    assert "grpo-toy" in capsys.readouterr().out


def test_run_grpo_toy_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "grpo-toy", "--out", str(tmp_path), *TINY]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the summary is printed last; DeepSpeed, when installed, logs a line to stdout when transformers
    # first saves a model, so parse from the summary's opening brace
    out = capsys.readouterr().out
    assert summary == json.loads(out[out.index("{\n") :])
    assert summary["steps"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]
    config = json.loads((tmp_path / "recipe.json").read_text())["config"]
    assert config["trainer"]["steps"] == 2 and config["trainer"]["lr"] == pytest.approx(1e-4)  # recipe default kept


def test_config_file_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("warmup_steps = 2\n[trainer]\nsteps = 1\ngroup_size = 3\n")
    out = tmp_path / "run"
    assert main(["run", "grpo-toy", "--out", str(out), "--config", str(cfg), *TINY[:6], "--set", "trainer.steps=1",
                 "--set", "trainer.progress=false", "--set", "trainer.eval_problems=4"]) == 0
    config = json.loads((out / "recipe.json").read_text())["config"]
    assert config["trainer"]["group_size"] == 3 and config["warmup_steps"] == 3


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "grpo-toy", "--out", str(tmp_path), "--set", "trainer.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "valid keys" in err
    assert main(["run", "nope"]) == 2
    assert "grpo-toy" in capsys.readouterr().err
    assert main(["run", "grpo-toy", "--config", str(tmp_path / "missing.toml")]) == 2


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "klcore.cli", "--help"], capture_output=True, text=True, check=True)
    assert "klcore run grpo-toy" in out.stdout and "KLCORE_DISABLE_PLUGIN_AUTOLOAD" in out.stdout


def test_parse_and_apply_overrides() -> None:
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello"
    assert parse_value('{weight = 0.5}') == {"weight": 0.5}
    data = apply_overrides({"a": {"b": 1}}, ["a.c=2", "d.e.f=x"])
    assert data == {"a": {"b": 1, "c": 2}, "d": {"e": {"f": "x"}}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError):
        apply_overrides({"a": 1}, ["a.b=2"])


@dataclass
class _Inner:
    x: int = 1


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    y: str = "a"


def test_from_dict_nested_and_unknown_keys() -> None:
    assert from_dict(_Outer, {"inner": {"x": 5}}).inner.x == 5
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(_Outer, {"inner": {"z": 5}})
