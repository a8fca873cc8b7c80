"""Plugin discovery through a real installed entry point, duplicates, broken plugins, opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from klcore import Component, hookimpl
from klcore.errors import ConfigError, DuplicateNameError, PluginError, UnknownNameError
from klcore.plugins import DISABLE_AUTOLOAD_ENV, Registered, build_plugin_manager

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "klcore-tinyplug"
version = "0.0.1"

[project.entry-points.klcore]
tinyplug = "tinyplug"
tinyplug_import_error = "tinyplug_broken"
tinyplug_register_error = "tinyplug.bad"

[tool.hatch.build.targets.wheel]
packages = ["tinyplug", "tinyplug_broken"]
"""

GOOD = """
from klcore import Component, hookimpl


def tiny_loss(old_log_prob, log_prob, advantages, mask, **kw):
    return (log_prob * 0).sum(), {}


@hookimpl
def klcore_register_losses():
    return [Component("tiny_loss", tiny_loss, help="a test loss")]
"""

BAD_REGISTER = """
from klcore import hookimpl


@hookimpl
def klcore_register_metrics():
    raise RuntimeError("registration exploded")
"""


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build and install a tiny plugin distribution into a target folder (no network)."""
    src = tmp_path_factory.mktemp("tinyplug-src")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "tinyplug").mkdir()
    (src / "tinyplug" / "__init__.py").write_text(textwrap.dedent(GOOD))
    (src / "tinyplug" / "bad.py").write_text(textwrap.dedent(BAD_REGISTER))
    (src / "tinyplug_broken").mkdir()
    (src / "tinyplug_broken" / "__init__.py").write_text("raise ImportError('missing dependency foo')\n")
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True,
    )
    return target


def test_entry_point_plugin_is_discovered(installed_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(installed_plugin))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    plugins = build_plugin_manager()
    entry = plugins.registry("loss")["tiny_loss"]
    assert entry.owner == "tinyplug"
    assert entry.distribution == "klcore-tinyplug"
    assert plugins.registry("loss").get_component("vanilla") is not None  # built-ins still there
    failed = {f.plugin: f for f in plugins.failures}
    assert set(failed) == {"tinyplug_import_error", "tinyplug_register_error"}
    assert failed["tinyplug_import_error"].stage == "import"
    assert "missing dependency foo" in failed["tinyplug_import_error"].error
    assert failed["tinyplug_register_error"].stage == "klcore_register_metrics"
    assert "registration exploded" in failed["tinyplug_register_error"].error
    # the failed plugin is unregistered: its hooks never run in a trainer
    assert plugins.pm.get_plugin("tinyplug_register_error") is None


def test_unknown_name_lists_installed_and_broken(installed_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(installed_plugin))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    plugins = build_plugin_manager()
    with pytest.raises(UnknownNameError) as info:
        plugins.registry("loss").get_component("nope")
    msg = str(info.value)
    assert "tiny_loss" in msg and "vanilla" in msg and "tinyplug_import_error" in msg


def test_env_var_disables_autoload(installed_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(installed_plugin))
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    plugins = build_plugin_manager()
    assert "tiny_loss" not in plugins.registry("loss")
    assert "vanilla" in plugins.registry("loss")
    assert plugins.failures == []


def test_cli_lists_entry_point_plugin(installed_plugin: Path) -> None:
    env_path = str(installed_plugin)
    out = subprocess.run(
        [sys.executable, "-c", "from klcore.cli import main; main(['plugins'])"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": env_path, DISABLE_AUTOLOAD_ENV: ""},
    ).stdout
    assert "tinyplug  (klcore-tinyplug)" in out
    assert "tiny_loss" in out
    assert "tinyplug_import_error  FAILED at import" in out


class _Registers:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def klcore_register_losses(self) -> list[Component]:
        return [Component(self.name, lambda *a, **k: None)]


def test_duplicate_names_name_both_owners() -> None:
    with pytest.raises(DuplicateNameError) as info:
        build_plugin_manager(plugins=[("first", _Registers("same")), ("second", _Registers("same"))], load_entrypoints=False)
    assert "'first'" in str(info.value) and "'second'" in str(info.value)
    with pytest.raises(DuplicateNameError, match="'klcore'"):
        build_plugin_manager(plugins=[("mine", _Registers("vanilla"))], load_entrypoints=False)


def test_fresh_manager_per_call() -> None:
    a = build_plugin_manager(plugins=[("p", _Registers("only_in_a"))], load_entrypoints=False)
    b = build_plugin_manager(load_entrypoints=False)
    assert "only_in_a" in a.registry("loss") and "only_in_a" not in b.registry("loss")


class _UnknownHook:
    @hookimpl
    def klcore_not_a_hook(self) -> None:
        return None


class _BadComponent:
    @hookimpl
    def klcore_register_recipes(self) -> list[object]:
        return ["not a component"]


def test_invalid_plugins_are_reported_not_raised() -> None:
    plugins = build_plugin_manager(plugins=[("odd", _UnknownHook()), ("bad", _BadComponent())], load_entrypoints=False)
    stages = {f.plugin: f.stage for f in plugins.failures}
    assert stages == {"odd": "validate", "bad": "klcore_register_recipes"}
    assert "vanilla" in plugins.registry("loss")


def test_enable_registers_runtime_object(plugins) -> None:
    class Reg:
        def __init__(self, weight: float) -> None:
            self.weight = weight

        @hookimpl
        def klcore_step_start(self, step: int) -> None:
            self.seen = step

    with_reg = build_plugin_manager(load_entrypoints=False)
    with_reg.registries["regulariser"].add(Registered(Component("r", Reg), owner="test"))
    obj = with_reg.enable("regulariser", "r", {"weight": 2.0})
    with_reg.hook.klcore_step_start(trainer=None, step=7)
    assert obj.weight == 2.0 and obj.seen == 7
    with pytest.raises(UnknownNameError):
        plugins.enable("regulariser", "r")


class _RegistersMany:
    @hookimpl
    def klcore_register_losses(self) -> list[Component]:
        return [Component("mine", lambda *a, **k: None), Component("vanilla", lambda *a, **k: None)]


def test_clash_leaves_nothing_half_loaded() -> None:
    plugins = build_plugin_manager(load_entrypoints=False)
    with pytest.raises(DuplicateNameError):
        plugins.load("clash", _RegistersMany())
    assert "mine" not in plugins.registry("loss")
    assert plugins.pm.get_plugin("clash") is None


def test_enable_rejects_bad_objects_and_options() -> None:
    class Misspelled:
        @hookimpl
        def klcore_extra_los(self) -> None:
            return None

    class Fine:
        def __init__(self, weight: float = 1.0) -> None:
            self.weight = weight

    plugins = build_plugin_manager(load_entrypoints=False)
    plugins.registries["regulariser"].add(Registered(Component("bad", Misspelled), owner="t"))
    plugins.registries["regulariser"].add(Registered(Component("fine", Fine), owner="t"))
    with pytest.raises(PluginError, match="klcore_extra_los"):
        plugins.enable("regulariser", "bad")
    with pytest.raises(ConfigError, match="wieght"):
        plugins.enable("regulariser", "fine", {"wieght": 2})
    plugins.enable("regulariser", "fine")
    with pytest.raises(PluginError):
        plugins.enable("regulariser", "fine")


def test_builtin_plugin_loads_without_transformers() -> None:
    """klcore without its [lm] extra (what dkm installs): every built-in component still registers."""
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # importing it now fails, as when it is not installed
        from klcore.plugins import build_plugin_manager
        plugins = build_plugin_manager(load_entrypoints=False)
        assert not plugins.failures, plugins.failures
        print(sorted(plugins.registry("recipe")), sorted(plugins.registry("reward")), sorted(plugins.registry("task")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'grpo'" in out and "'math_verify'" in out and "'reasoning_gym'" in out
