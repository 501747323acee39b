"""An async cache (aiocache) that stays coherent across workers without messages.

``get_or_load(key, loader)`` returns the cached value or calls ``loader`` — once per
key per process even when many requests miss together (single flight). Every key is
prefixed with a *scope* naming the data the value was built from, by the database
revisions of the tables behind it (the same on every host):

* ``d:flags@12,limits@9.2:`` — built from those datasets at those revisions;
* ``s5f3c0e9a1b2d:`` — built from the whole snapshot (a digest of every dataset's
  revisions; the default).

When the leader publishes, each worker swaps and its old scopes become unreachable at
once: no invalidation broadcast is needed (aiocache has none; docs/design.md,
pitfall 6). A change to one dataset retires only the scopes that name it (and the
snapshot scopes); values built from the other datasets stay cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from aiocache import SimpleMemoryCache

from ..observability.metrics import Counts

__all__ = ["CacheBackend", "ServiceCache", "SharedLoads"]

T = TypeVar("T")


class CacheBackend(Protocol):
    """What :class:`ServiceCache` calls on its backend: aiocache's ``SimpleMemoryCache``
    (the default), or ``quart_service.coordination.redis_cache.RedisCacheBackend``."""

    async def get(self, key: str, default: Any = None) -> Any: ...

    async def set(self, key: str, value: Any, ttl: float | None = None) -> Any: ...

    async def clear(self, namespace: str | None = None) -> Any: ...

    async def close(self) -> Any: ...


@runtime_checkable
class SharedLoads(Protocol):
    """A backend that can make a load single-flight across processes: ``load_once``
    loads and stores ``(value,)`` under ``key`` unless another process is doing so
    already, in which case it waits for that value. Returns the stored 1-tuple."""

    async def load_once(
        self, key: str, load: Callable[[], Awaitable[tuple[Any]]], ttl: float | None
    ) -> tuple[Any]: ...


class ServiceCache:
    """Scoped, single-flight cache in front of an aiocache backend."""

    def __init__(
        self,
        default_ttl: float,
        current_scope: Callable[[], str],
        *,
        lookups: Counts | None = None,
        loads: Counts | None = None,
        backend: CacheBackend | None = None,
    ) -> None:
        # timeout=0: no asyncio.wait_for (a task per call) around in-memory operations.
        self._backend: CacheBackend = backend or SimpleMemoryCache(timeout=0)
        self._shared = backend if isinstance(backend, SharedLoads) else None
        self._default_ttl = default_ttl
        self._current_scope = current_scope
        self._scopes: set[str] = set()
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.lookups = lookups if lookups is not None else Counts()  # hit, miss
        self.loads = loads if loads is not None else Counts()  # ok, error

    def key(self, key: str, scope: str | None = None) -> str:
        """The backend key: ``<scope>:<key>`` (the current snapshot's by default)."""
        return f"{scope or self._current_scope()}:{key}"

    @staticmethod
    def snapshot_scope(stamp: str) -> str:
        """The scope of values built from a whole snapshot (its stamp)."""
        return f"s{stamp}"

    @staticmethod
    def dataset_scope(stamps: Mapping[str, str]) -> str:
        """The scope of values built from these datasets at these revision stamps."""
        return "d:" + ",".join(f"{name}@{stamp}" for name, stamp in sorted(stamps.items()))

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | None = None,
        *,
        scope: str | None = None,
    ) -> T:
        """The value for ``key`` in a scope, loading it once on a miss.

        Pass the ``scope`` of the data that ``loader`` reads, so a value loaded from an
        older snapshot can never be stored where a newer one is looked up
        (``quart_service.cached()`` does this with the request's snapshot)."""
        scope = scope or self._current_scope()
        self._scopes.add(scope)
        full = self.key(key, scope)
        # Values are stored wrapped in a 1-tuple so that a cached None is a hit.
        cached = await self._backend.get(full)
        if cached is not None:
            self.lookups.inc("hit")
            value: T = cached[0]
            return value
        self.lookups.inc("miss")
        pending = self._inflight.get(full)
        if pending is not None:
            result: T = await asyncio.shield(pending)
            return result
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[full] = future
        lifetime = (self._default_ttl if ttl is None else ttl) or None
        loaded_here = True
        try:
            if self._shared is None:
                value = await loader()
                await self._backend.set(full, (value,), ttl=lifetime)
            else:
                loaded_here = False

                async def load() -> tuple[Any]:
                    nonlocal loaded_here
                    loaded_here = True
                    return (await loader(),)

                value = (await self._shared.load_once(full, load, lifetime))[0]
        except BaseException as exc:
            self.loads.inc("error")
            future.set_exception(exc)
            # The error goes to every waiter; nothing is cached, the next miss retries.
            future.exception()  # retrieved here so an unawaited future does not warn
            raise
        else:
            if loaded_here:  # not when another process loaded it (SharedLoads)
                self.loads.inc("ok")
            future.set_result(value)
            return value
        finally:
            del self._inflight[full]

    def identity(self) -> dict[str, int | float]:
        """This worker's lookups and loads."""
        lookups, loads = self.lookups.as_dict(), self.loads.as_dict()
        return {
            "hits": lookups.get("hit", 0),
            "misses": lookups.get("miss", 0),
            "loads": loads.get("ok", 0),
            "load_errors": loads.get("error", 0),
        }

    async def retire(self, current: str, stamps: Mapping[str, str]) -> int:
        """Drop the entries of every scope that is not current: other snapshot scopes
        than ``current``, and dataset scopes naming a stamp not in ``stamps``. Returns
        how many scopes went. (Old scopes are unreachable already; this frees their
        memory.)"""
        if self._shared is not None:
            # Shared by hosts (Redis): another host may not have swapped yet, and a
            # scan per swap per worker would cost more than the memory; TTLs free it.
            return 0
        gone = [
            scope
            for scope in self._scopes
            if scope != current and not _scope_is_current(scope, stamps)
        ]
        for scope in gone:
            self._scopes.discard(scope)
            await self._backend.clear(namespace=f"{scope}:")
        return len(gone)

    async def clear(self) -> None:
        """Drop every entry (of every generation)."""
        await self._backend.clear()

    async def close(self) -> None:
        """Release the backend."""
        await self._backend.close()


def _scope_is_current(scope: str, stamps: Mapping[str, str]) -> bool:
    if not scope.startswith("d:"):
        return False
    for part in scope[2:].split(","):
        name, _, stamp = part.rpartition("@")
        if stamps.get(name) != stamp:
            return False
    return True
