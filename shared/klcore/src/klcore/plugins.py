"""The plugin manager: discovery, registries of named components, and failure isolation.

``build_plugin_manager()`` returns a fresh :class:`Plugins` per run (there is no module global), so
different runs in one process can use different plugin sets. Built-ins and entry points go through
the same loading path: register the plugin object, validate its hook implementations, call its
registration hooks and file the components. A plugin that fails at any stage is unregistered and
reported in ``Plugins.failures`` (and by ``klcore plugins``); the other plugins keep working.

Set ``KLCORE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points (only built-ins and plugins passed
explicitly are loaded).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from klcore import hookspecs
from klcore.errors import ConfigError, DuplicateNameError, PluginError, UnknownNameError
from klcore.hookspecs import Component

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "klcore"
DISABLE_AUTOLOAD_ENV = "KLCORE_DISABLE_PLUGIN_AUTOLOAD"
#: kind -> registration hook name
KINDS: dict[str, str] = {
    "loss": "klcore_register_losses",
    "regulariser": "klcore_register_regularisers",
    "metric": "klcore_register_metrics",
    "reward": "klcore_register_rewards",
    "task": "klcore_register_tasks",
    "recipe": "klcore_register_recipes",
}


@dataclass(frozen=True)
class Registered:
    """A component and the plugin (and distribution, when installed) that registered it."""

    component: Component
    owner: str
    distribution: str | None = None


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded: its name, the stage that failed and the error text."""

    plugin: str
    stage: str
    error: str


class Registry(Mapping[str, Registered]):
    """Components of one kind by name. ``get_component(name)`` names what is installed on a miss."""

    def __init__(self, kind: str, failures: list[PluginFailure]) -> None:
        self.kind = kind
        self._items: dict[str, Registered] = {}
        self._failures = failures

    def __getitem__(self, name: str) -> Registered:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def check_new(self, entries: list[Registered]) -> None:
        """Raise ``DuplicateNameError`` if any of ``entries`` clashes with the registry or with another."""
        seen = dict(self._items)
        for entry in entries:
            name = entry.component.name
            if name in seen:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} is registered by both plugin {seen[name].owner!r} and plugin "
                    f"{entry.owner!r}; uninstall one of them or rename the component"
                )
            seen[name] = entry

    def add(self, entry: Registered) -> None:
        self.check_new([entry])
        self._items[entry.component.name] = entry

    def get_component(self, name: str) -> Any:
        """The ``obj`` of the component called ``name``."""
        if name not in self._items:
            installed = ", ".join(sorted(self._items)) or "none"
            msg = f"unknown {self.kind} {name!r}; installed: {installed}"
            if self._failures:
                msg += "; plugins that failed to load: " + ", ".join(f.plugin for f in self._failures)
            raise UnknownNameError(msg)
        return self._items[name].component.obj


class Plugins:
    """A plugin manager with one registry per component kind. Build with ``build_plugin_manager``."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.registries = {kind: Registry(kind, self.failures) for kind in KINDS}
        self.distributions: dict[str, str | None] = {}

    @property
    def hook(self) -> Any:
        """``pm.hook``: call run-time hooks as ``plugins.hook.klcore_step_end(...)``."""
        return self.pm.hook

    def registry(self, kind: str) -> Registry:
        if kind not in self.registries:
            raise UnknownNameError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        return self.registries[kind]

    def load(self, name: str, plugin: object, *, distribution: str | None = None) -> bool:
        """Register ``plugin`` under ``name`` and file its components; on failure record it, return False.

        A ``DuplicateNameError`` is not a plugin failure: it propagates, naming both owners.
        """
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validation errors, duplicate plugin names
            self._fail(name, "register", exc)
            return False
        unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or [] if hc.spec is None]
        if unknown:
            self.pm.unregister(plugin)
            self._fail(name, "validate", PluginError(f"implements hooks klcore does not define: {unknown}"))
            return False
        entries: list[tuple[str, Registered]] = []
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    components = list(impl.function() or [])
                    for c in components:
                        if not isinstance(c, Component) or not isinstance(c.name, str) or not c.name:
                            raise PluginError(f"{hook_name} must return Component records with a name, got {c!r}")
                except Exception as exc:
                    self.pm.unregister(plugin)
                    self._fail(name, hook_name, exc)
                    return False
                entries += [(kind, Registered(c, owner=name, distribution=distribution)) for c in components]
        try:
            for kind in KINDS:  # check every name before filing any, so a clash leaves nothing half-loaded
                self.registries[kind].check_new([e for k, e in entries if k == kind])
        except DuplicateNameError:
            self.pm.unregister(plugin)
            raise
        for kind, entry in entries:
            self.registries[kind].add(entry)
        self.distributions[name] = distribution
        return True

    def enable(self, kind: str, name: str, options: Mapping[str, Any] | None = None) -> object:
        """Build the ``kind`` component ``name`` with ``options`` and register it for this run."""
        factory = self.registry(kind).get_component(name)
        try:
            obj = factory(**dict(options or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build {kind} {name!r} with options {dict(options or {})}: {exc}") from exc
        try:
            self.pm.register(obj, name=f"{kind}:{name}")
        except ValueError as exc:  # pluggy: already registered, or a hook with arguments its spec lacks
            raise PluginError(f"cannot enable {kind} {name!r}: {exc}") from exc
        unknown = [hc.name for hc in self.pm.get_hookcallers(obj) or [] if hc.spec is None]
        if unknown:
            self.pm.unregister(obj)
            raise PluginError(f"{kind} {name!r} implements hooks klcore does not define: {unknown}")
        return obj

    def call_each(self, hook_name: str, **kwargs: Any) -> dict[str, Any]:
        """Call every implementation of a run-time hook separately: ``{plugin name: result}``."""
        results: dict[str, Any] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            args = {k: kwargs[k] for k in impl.argnames}
            results[impl.plugin_name] = impl.function(**args)
        return results

    def _fail(self, name: str, stage: str, exc: BaseException) -> None:
        failure = PluginFailure(name, stage, f"{type(exc).__name__}: {exc}")
        self.failures.append(failure)
        log.warning("klcore plugin %r failed at %s and was skipped: %s", name, stage, failure.error)


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def build_plugin_manager(
    *, plugins: Iterable[tuple[str, object]] = (), load_entrypoints: bool | None = None
) -> Plugins:
    """A fresh manager with the built-ins, the ``klcore`` entry points and ``plugins`` (name, object).

    ``load_entrypoints=None`` loads entry points unless ``KLCORE_DISABLE_PLUGIN_AUTOLOAD`` is set
    to a true value (``1``, ``true``, ``yes``).
    """
    from klcore import builtin

    manager = Plugins()
    manager.load("klcore", builtin, distribution="klcore")
    if load_entrypoints is None:
        load_entrypoints = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
    if load_entrypoints:
        for ep in _entry_points():
            dist = ep.dist.name if ep.dist is not None else None
            try:
                obj = ep.load()
            except Exception as exc:
                manager._fail(ep.name, "import", exc)
                continue
            manager.load(ep.name, obj, distribution=dist)
    for name, obj in plugins:
        manager.load(name, obj)
    return manager


__all__ = [
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PluginFailure",
    "Plugins",
    "Registered",
    "Registry",
    "build_plugin_manager",
]
