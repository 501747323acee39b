"""An async cache (aiocache) that stays coherent across workers without messages.

``get_or_load(key, loader)`` returns the cached value or calls ``loader`` — once per
key per process even when many requests miss together (single flight). Every key is
prefixed with the snapshot generation this worker serves, so when the leader
publishes a new generation each worker's old entries become unreachable the moment it
swaps: no invalidation broadcast is needed (aiocache has none, DESIGN.md pitfall 6).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiocache import SimpleMemoryCache

from .metrics.families import ExportedCounts, ServiceMetrics

__all__ = ["ServiceCache"]

T = TypeVar("T")


class ServiceCache:
    """Generation-scoped, single-flight cache in front of an aiocache backend."""

    def __init__(self, default_ttl: float, generation: Callable[[], int]) -> None:
        # timeout=0: no asyncio.wait_for (a task per call) around in-memory operations.
        self._backend = SimpleMemoryCache(timeout=0)
        self._default_ttl = default_ttl
        self._generation = generation
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.counters: Counter[str] = ExportedCounts(_export)  # hits, misses, loads, ...

    def key(self, key: str, generation: int | None = None) -> str:
        """The backend key: ``g<generation>:<key>`` (this worker's generation by default)."""
        return f"g{self._generation() if generation is None else generation}:{key}"

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | None = None,
        *,
        generation: int | None = None,
    ) -> T:
        """The value for ``key`` in a generation, loading it once on a miss.

        Pass the ``generation`` of the snapshot that ``loader`` reads from, so a value
        loaded from an older snapshot can never be stored under a newer generation
        (``quart_service.cached()`` does this with the request's snapshot)."""
        full = self.key(key, generation)
        # Values are stored wrapped in a 1-tuple so that a cached None is a hit.
        cached = await self._backend.get(full)
        if cached is not None:
            self.counters["hits"] += 1
            value: T = cached[0]
            return value
        self.counters["misses"] += 1
        pending = self._inflight.get(full)
        if pending is not None:
            result: T = await asyncio.shield(pending)
            return result
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[full] = future
        try:
            self.counters["loads"] += 1
            value = await loader()
            lifetime = self._default_ttl if ttl is None else ttl
            await self._backend.set(full, (value,), ttl=lifetime or None)
        except BaseException as exc:
            self.counters["load_errors"] += 1
            future.set_exception(exc)
            # The error goes to every waiter; nothing is cached, the next miss retries.
            future.exception()  # retrieved here so an unawaited future does not warn
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._inflight[full]

    async def clear(self) -> None:
        """Drop every entry (of every generation)."""
        await self._backend.clear()

    async def close(self) -> None:
        """Release the backend."""
        await self._backend.close()


def _export(metrics: ServiceMetrics, key: str) -> Any:
    """The metric child each cache counter feeds."""
    if key in ("hits", "misses"):
        return metrics.cache_requests.labels(key[:-1] if key == "misses" else "hit")
    if key in ("loads", "load_errors"):
        return metrics.cache_loads.labels("ok" if key == "loads" else "error")
    return None
