"""What views and team code call to reach this worker's service: the accessors.

Each works inside a request (or while the app serves) and returns this process's
object::

    @bp.get("/score")
    async def score() -> dict[str, float]:
        model = await resources().get(MODEL)      # this worker's singleton
        flags = await dataset(FLAGS)               # this request's version of a dataset
        value = await cached("k", load, datasets=[FLAGS])  # dropped when FLAGS changes
        return {"score": model.predict(value), "on": flags.get("beta") is not None}

Inside a request, :func:`snapshot` and :func:`dataset` return the same version from
start to end of it. Outside one (a resource's factory, a background task) they return
the version this worker serves now.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, overload

from quart import current_app, g, has_request_context, has_websocket_context

from .config import Settings
from .data.cache import ServiceCache
from .data.database import Database
from .data.datasets import Dataset
from .data.layer import SNAPSHOT, DataLayer
from .data.published import DatasetView
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
    "dataset",
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
    in_request = has_request_context() or has_websocket_context()
    held: Snapshot | None = g.get(_SNAPSHOT_KEY) if in_request else None
    if held is None:
        await resources().get(SNAPSHOT)  # waits for the first one
        held = data().snapshot
        assert held is not None
        if in_request:
            setattr(g, _SNAPSHOT_KEY, held)
    return held


@overload
async def dataset(spec: Dataset[T]) -> DatasetView[T]: ...
@overload
async def dataset(spec: str) -> DatasetView[Any]: ...
async def dataset(spec: Dataset[Any] | str) -> DatasetView[Any]:
    """This request's version of a dataset (503 ``dataset_unavailable`` if it has
    never loaded)."""
    return (await snapshot()).dataset(spec)


async def cached(
    key: str,
    loader: Callable[[], Awaitable[T]],
    ttl: float | None = None,
    *,
    datasets: Sequence[Dataset[Any] | str] | None = None,
) -> T:
    """``cache().get_or_load`` scoped to the data ``loader`` reads, in this request's
    snapshot: the revisions of ``datasets`` when given (the value survives changes to
    other datasets), else the whole snapshot's."""
    current = await snapshot()
    store = cache()
    if datasets is None:
        scope = store.snapshot_scope(current.stamp)
    else:
        stamps = {
            name: current.dataset(name).stamp
            for name in (d if isinstance(d, str) else d.name for d in datasets)
        }
        scope = store.dataset_scope(stamps)
    return await store.get_or_load(key, loader, ttl, scope=scope)
