"""This process's engine instances: one per model, rebuilt only when its row changed.

Factories come from the built-ins and the entry-point group ``quart_service.engines``,
read once per process. An instance is keyed by model name and fingerprinted by the
row's engine, parameters and ``updated_at``: an admin change to one model rebuilds that
model's engine alone; the others keep their instances (and their ids).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from ..data.models import ModelConfig
from ..errors import EngineError
from .base import Engine, EngineContext, EngineFactory

__all__ = ["ENTRY_POINT_GROUP", "EngineRegistry", "discover_factories"]

_log = logging.getLogger("quart_service.engines")

ENTRY_POINT_GROUP = "quart_service.engines"
_BUILTIN = {
    "local": "quart_service.engines.local:create",
    "upstream": "quart_service.engines.upstream:create",
}


def _load(target: str) -> EngineFactory:
    module, _, attribute = target.partition(":")
    factory: EngineFactory = getattr(importlib.import_module(module), attribute)
    return factory


def discover_factories() -> dict[str, EngineFactory]:
    """Built-in factories plus installed ones; a broken plugin is logged and skipped."""
    factories = {name: _load(target) for name, target in _BUILTIN.items()}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in factories:
            _log.warning("engine plugin %r ignored: the name is taken", point.name)
            continue
        try:
            factories[point.name] = point.load()
        except Exception:
            _log.exception("engine plugin %r failed to load; skipped", point.name)
    return factories


@dataclass(slots=True)
class _Built:
    fingerprint: str
    engine: Engine
    instance_id: str
    built_at: float


def _fingerprint(model: ModelConfig) -> str:
    return json.dumps(
        [model.engine, model.as_dict()["parameters"], model.updated_at], sort_keys=True
    )


class EngineRegistry:
    """Builds engines lazily, once per model row version, in this process."""

    def __init__(self, factories: dict[str, EngineFactory], context: EngineContext) -> None:
        self.factories = factories
        self._context = context
        self._built: dict[str, _Built] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, model: ModelConfig) -> Engine:
        """The engine for ``model``, built on first use or when its row changed."""
        fingerprint = _fingerprint(model)
        built = self._built.get(model.name)
        if built is not None and built.fingerprint == fingerprint:
            return built.engine
        async with self._locks.setdefault(model.name, asyncio.Lock()):
            built = self._built.get(model.name)
            if built is not None and built.fingerprint == fingerprint:
                return built.engine
            factory = self.factories.get(model.engine)
            if factory is None:
                raise EngineError(
                    f"model {model.name!r} uses engine {model.engine!r}, which is not "
                    f"installed; installed engines: {', '.join(sorted(self.factories))}"
                )
            engine = await factory(model, self._context)
            self._built[model.name] = _Built(
                fingerprint, engine, uuid.uuid4().hex[:12], time.time()
            )
            _log.info("engine for model %r built (%s)", model.name, model.engine)
            if built is not None:
                await built.engine.aclose()
            return engine

    def status(self) -> list[dict[str, Any]]:
        """Each built engine's model, instance id and build time, and its own
        counters where it keeps some (a ``stats()`` method: the neural engine's
        batchers)."""
        answer = []
        for name, built in sorted(self._built.items()):
            row: dict[str, Any] = {
                "model": name,
                "instance_id": built.instance_id,
                "built_at": built.built_at,
            }
            stats = getattr(built.engine, "stats", None)
            if callable(stats):
                row["stats"] = stats()
            answer.append(row)
        return answer

    async def aclose(self) -> None:
        """Close every instance (at shutdown)."""
        for built in self._built.values():
            await built.engine.aclose()
        self._built.clear()
