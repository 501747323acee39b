"""Team blueprints: found through entry points or import strings, mounted once.

A team's package declares its blueprint (or a :class:`Plugin`, to bring resources,
datasets and its own migrations)::

    [project.entry-points."quart_service.blueprints"]
    search = "search_team.routes:plugin"

Each worker loads them once, when ``create_app`` runs. A plugin that fails to import or
register is reported by its name and error; ``plugin_failure`` decides whether the
service then refuses to start (``fail``) or skips it and lists it on ``/readyz`` and
``/debug/identity`` (``skip``). Two blueprints that claim the same route, or the same
name, are refused at start-up with a message naming both.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from quart import Blueprint, Quart, Request

from ..data.datasets import Dataset
from ..data.migrations import MigrationSource
from ..errors import PluginError, PluginUnavailable
from ..observability.metrics import Metrics
from ..part import Readiness
from ..singletons import Resource

__all__ = [
    "ENTRY_POINT_GROUP",
    "LoadedPlugins",
    "Plugin",
    "import_string",
    "load_plugins",
]

_log = logging.getLogger("quart_service.plugins")

ENTRY_POINT_GROUP = "quart_service.blueprints"


@dataclass(frozen=True)
class Plugin:
    """A blueprint with what it brings: the per-process resources it uses, the
    datasets it reads, and the folder of its own migrations (its own history)."""

    blueprint: Blueprint
    resources: Sequence[Resource[Any]] = ()
    datasets: Sequence[Dataset[Any]] = ()
    migrations: Path | None = None


@dataclass
class LoadedPlugins:
    """What loading found (the mounted plugins, the skipped ones with their error), as
    a part of the worker: skipped plugins are named on ``/readyz``."""

    mounted: dict[str, str] = field(default_factory=dict)  # name -> URL prefix
    skipped: dict[str, str] = field(default_factory=dict)  # name -> error
    resources: list[Resource[Any]] = field(default_factory=list)
    datasets: list[Dataset[Any]] = field(default_factory=list)
    migrations: dict[str, Path] = field(default_factory=dict)  # name -> folder
    dataset_owners: dict[str, str] = field(default_factory=dict)  # dataset -> name
    blueprints: dict[str, str] = field(default_factory=dict)  # name -> blueprint name
    name: str = "plugins"
    _unavailable: dict[str, str] = field(default_factory=dict)  # blueprint -> plugin

    async def start(self, metrics: Metrics) -> None:
        """Plugins were mounted when the app was built; nothing to start."""

    async def stop(self) -> None:
        """Their resources are closed by the registry."""

    def migration_sources(self) -> list[MigrationSource]:
        """The plugins' migration folders, in the order they are applied (by name)."""
        return [MigrationSource(name, folder) for name, folder in sorted(self.migrations.items())]

    def fail(self, name: str, error: str) -> None:
        """Skip a mounted plugin that failed after mounting (its migrations): its
        routes answer 503 ``plugin_unavailable`` from now on."""
        self.skipped[name] = error
        blueprint = self.blueprints.get(name)
        if blueprint is not None:
            self._unavailable[blueprint] = name

    def gate(self, request: Request) -> None:
        """Request step: refuse the routes of a plugin skipped after mounting."""
        name = self._unavailable.get(request.blueprint or "") if self._unavailable else None
        if name is not None:
            raise PluginUnavailable(
                f"team plugin {name!r} is unavailable: {self.skipped[name]}", retry_after=60
            )

    async def readiness(self) -> Readiness:
        """A skipped plugin does not make the worker unready; it is named."""
        return Readiness(checks={"skipped": dict(self.skipped)})

    def identity(self) -> dict[str, Any]:
        """The mounted and the skipped plugins."""
        return {"mounted": dict(self.mounted), "skipped": dict(self.skipped)}


def import_string(target: str) -> Any:
    """The object named by ``module:attribute``."""
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ValueError(f"{target!r} is not a 'module:attribute' import string")
    return getattr(importlib.import_module(module), attribute)


def _candidates(import_strings: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, loader) for every entry point and import string, in a stable order."""
    found: list[tuple[str, Any]] = [
        (point.name, point.load) for point in entry_points(group=ENTRY_POINT_GROUP)
    ]
    found.sort(key=lambda item: item[0])
    for target in import_strings:
        found.append((target, lambda target=target: import_string(target)))
    return found


def load_plugins(
    app: Quart,
    import_strings: Sequence[str],
    prefixes: dict[str, str],
    disabled: set[str],
    strict: bool,
) -> LoadedPlugins:
    """Import, check and register every team blueprint on ``app``."""
    loaded = LoadedPlugins()
    owners: dict[tuple[str, frozenset[str]], str] = {
        (rule.rule, _methods(rule.methods)): rule.endpoint.split(".")[0]
        for rule in app.url_map.iter_rules()
    }
    for name, load in _candidates(import_strings):
        if name in disabled:
            _log.info("team blueprint %r is disabled by setting", name)
            continue
        try:
            plugin = _as_plugin(name, load())
            prefix = prefixes.get(name, plugin.blueprint.url_prefix or "")
            _register(app, name, plugin.blueprint, prefix, owners)
        except PluginError:
            raise  # collisions are never skipped: they are a deployment mistake
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if strict:
                raise PluginError(
                    f"team blueprint {name!r} failed to load: {error} "
                    "(set QUART_SERVICE_PLUGIN_FAILURE=skip to start without it)"
                ) from exc
            _log.error("team blueprint %r skipped: %s", name, error)
            loaded.skipped[name] = error
            continue
        loaded.mounted[name] = prefix or "/"
        loaded.blueprints[name] = plugin.blueprint.name
        loaded.resources.extend(plugin.resources)
        loaded.datasets.extend(plugin.datasets)
        loaded.dataset_owners.update(dict.fromkeys((d.name for d in plugin.datasets), name))
        if plugin.migrations is not None:
            loaded.migrations[name] = Path(plugin.migrations)
    return loaded


def _as_plugin(name: str, value: Any) -> Plugin:
    if isinstance(value, Plugin):
        return value
    if isinstance(value, Blueprint):
        return Plugin(value)
    raise TypeError(f"{name!r} points to a {type(value).__name__}, not a Blueprint or Plugin")


def _register(
    app: Quart,
    name: str,
    blueprint: Blueprint,
    prefix: str,
    owners: dict[tuple[str, frozenset[str]], str],
) -> None:
    if blueprint.name in app.blueprints:
        raise PluginError(
            f"team blueprint {name!r} is named {blueprint.name!r}, like a blueprint "
            "already mounted; blueprint names must be unique"
        )
    before = {id(rule) for rule in app.url_map.iter_rules()}  # rules are not hashable
    app.register_blueprint(blueprint, url_prefix=prefix or None)
    added = [rule for rule in app.url_map.iter_rules() if id(rule) not in before]
    for rule in added:
        methods = _methods(rule.methods)
        for (path, other_methods), owner in owners.items():
            if path == rule.rule and methods & other_methods:
                raise PluginError(
                    f"route collision: {rule.rule} ({', '.join(sorted(methods & other_methods))})"
                    f" is claimed by both {owner!r} and {name!r} ({blueprint.name!r})"
                )
        owners[(rule.rule, methods)] = name


def _methods(methods: Any) -> frozenset[str]:
    # HEAD and OPTIONS are added to every rule: they do not make two rules collide.
    return frozenset(methods or ()) - {"HEAD", "OPTIONS"}
