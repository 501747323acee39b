"""What views and team code call to reach this worker's service: the accessors.

Each works inside a request (or while the app serves) and returns this process's
object::

    @bp.get("/score")
    async def score() -> dict[str, float]:
        model = await resources().get(MODEL)      # this worker's singleton
        snap = await snapshot()                    # the data, fixed for this request
        value = await cached("k", load)            # scoped to that snapshot's generation
        return {"score": model.predict(value), "threads": settings().executor_threads}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from quart import current_app, g

from .config import Settings
from .data.cache import ServiceCache
from .data.database import Database
from .data.layer import SNAPSHOT, DataLayer
from .data.snapshot import Snapshot
from .engines.host import EngineHost
from .executor import BoundedExecutor, Pool
from .part import current_part
from .singletons import ResourceRegistry

__all__ = [
    "SETTINGS_KEY",
    "cache",
    "cached",
    "data",
    "database",
    "engines",
    "pool",
    "resources",
    "settings",
    "snapshot",
]

T = TypeVar("T")
SETTINGS_KEY = "quart_service.settings"
_SNAPSHOT_KEY = "_quart_service_snapshot"


def settings() -> Settings:
    """The service's settings."""
    value: Settings = current_app.extensions[SETTINGS_KEY]
    return value


def resources() -> ResourceRegistry:
    """This process's resource registry: ``await resources().get(MY_RESOURCE)``."""
    registry: ResourceRegistry = current_part(ResourceRegistry.name)
    return registry


def pool() -> BoundedExecutor:
    """This process's one thread pool."""
    part: Pool = current_part(Pool.name)
    return part.executor


def data() -> DataLayer:
    """This process's data layer (database, refresh plane, cache)."""
    layer: DataLayer = current_part(DataLayer.name)
    return layer


def engines() -> EngineHost:
    """This process's engines and AI counts."""
    host: EngineHost = current_part(EngineHost.name)
    return host


def cache() -> ServiceCache:
    """This process's cache: ``await cache().get_or_load(key, loader)``."""
    return data().cache


def database() -> Database:
    """This process's database handle (the connection opens on its first query)."""
    return data().database


async def snapshot() -> Snapshot:
    """The data snapshot for this request: the same object from start to end of it."""
    held: Snapshot | None = g.get(_SNAPSHOT_KEY)
    if held is None:
        await resources().get(SNAPSHOT)  # loads it on first use
        held = data().snapshot
        assert held is not None
        setattr(g, _SNAPSHOT_KEY, held)
    return held


async def cached(key: str, loader: Callable[[], Awaitable[T]], ttl: float | None = None) -> T:
    """``cache().get_or_load`` scoped to this request's snapshot generation."""
    current = await snapshot()
    return await cache().get_or_load(key, loader, ttl, generation=current.generation)
