"""A shared cache backend on ``redis.asyncio``, for :class:`quart_service.ServiceCache`.

Why not aiocache's ``RedisCache``: aiocache 0.12.3 against redis-py 8.1.0 and
redis-server 7.0 (checked 2026-11-25; docs/design.md pitfall 14):

* ``clear(namespace="g1:")`` deletes nothing: it looks the keys up with
  ``KEYS g1::*`` (it adds a ``:`` the keys do not have), and ``KEYS`` blocks the
  server for a scan of the whole keyspace;
* ``clear()`` without a namespace is ``FLUSHDB``: it would wipe the lease and the
  snapshot of every deployment sharing the database;
* 200 concurrent ``get`` fail with ``redis.exceptions.MaxConnectionsError: Too many
  connections`` (redis-py 8's pool raises at 100 connections instead of waiting);
* ``set(..., ttl=10)`` and ``close()`` call redis-py methods deprecated since 2.6.12
  and 5.0.1 (``DeprecationWarning``, an error under this project's pytest settings);
* a client cannot be passed in (``RedisCache(client)`` takes it as the serializer).

This backend has the calls ``ServiceCache`` makes (get, set with a TTL, delete,
clear by namespace, close), and optionally (``single_flight=True``) a load that runs
once across processes (``load_once``: a ``SET NX PX`` flight lock; the others poll
for the value). Values are pickled (the service both writes and reads
them; never point it at a Redis that others can write to). Keys live under
``<prefix>:cache:``. ``clear(namespace)`` walks ``SCAN MATCH`` and ``UNLINK``-s in
batches, never blocking the server. A Redis that cannot be reached is a miss: ``get``
answers None and ``set`` stores nothing for ``retry_after`` seconds, so requests are
served (slower, from their loaders) rather than failed.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from .redis import DEFAULT_PREFIX, Unavailable

__all__ = ["RedisCacheBackend"]

_log = logging.getLogger("quart_service.cache")

# KEYS[1] the flight lock; ARGV[1] the token: delete it only if it is still ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_GLOB_SPECIALS = str.maketrans({c: "\\" + c for c in "*?[]\\"})


class RedisCacheBackend:
    """get/set/delete/clear/close over one Redis client, keys under a prefix."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        owns_client: bool = False,
        retry_after: float = 1.0,
        scan_count: int = 500,
        single_flight: bool = False,
        flight_ttl: float = 10.0,
        flight_poll: float = 0.02,
    ) -> None:
        self._client = client
        self.key_prefix = f"{prefix}:cache:"
        self._owns_client = owns_client
        self._retry_after = retry_after
        self._scan_count = scan_count
        self._down_until = 0.0
        self._down = False
        self.errors = 0
        self.single_flight = single_flight
        self.flight_prefix = f"{prefix}:cacheflight:"
        self._flight_ttl = flight_ttl
        self._flight_poll = flight_poll
        self._unlock = client.register_script(_UNLOCK)

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` (also while Redis is down)."""
        if self._skipping():
            return default
        try:
            raw = await self._client.get(self._key(key))
        except Unavailable as exc:
            self._failed(exc)
            return default
        self._ok()
        if raw is None:
            return default
        if not isinstance(raw, bytes):
            raise TypeError("the cache's Redis client must not decode responses")
        return pickle.loads(raw)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` for ``ttl`` seconds (None or 0: no expiry). False if Redis
        could not be reached."""
        if self._skipping():
            return False
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        px = max(1, round(ttl * 1000)) if ttl else None
        try:
            await self._client.set(self._key(key), data, px=px)
        except Unavailable as exc:
            self._failed(exc)
            return False
        self._ok()
        return True

    async def delete(self, key: str) -> int:
        """Remove ``key``; how many keys went (0 or 1)."""
        return int(await self._client.unlink(self._key(key)))

    async def clear(self, namespace: str | None = None) -> bool:
        """Remove every key that starts with ``namespace`` (every cache key if None;
        never a key outside this backend's prefix). Incremental: SCAN + UNLINK."""
        pattern = (self.key_prefix + (namespace or "")).translate(_GLOB_SPECIALS) + "*"
        batch: list[bytes] = []
        async for key in self._client.scan_iter(match=pattern, count=self._scan_count):
            batch.append(key)
            if len(batch) >= self._scan_count:
                await self._client.unlink(*batch)
                batch = []
        if batch:
            await self._client.unlink(*batch)
        return True

    async def load_once(
        self, key: str, load: Callable[[], Awaitable[tuple[Any]]], ttl: float | None
    ) -> tuple[Any]:
        """Load and store ``key``; with ``single_flight``, once across processes.

        The first process to ``SET <prefix>:cacheflight:<key> NX PX flight_ttl`` loads;
        the others read the value every ``flight_poll`` seconds until it is stored,
        and load it themselves if the flight lock goes (the loader failed) or after
        ``flight_ttl`` (a loader slower than that is run twice). Without
        ``single_flight``, or while Redis cannot be reached: load and store here."""
        if not self.single_flight or self._skipping():
            return await self._load_and_set(key, load, ttl)
        lock, token = self.flight_prefix + key, uuid.uuid4().hex
        try:
            first = await self._client.set(lock, token, nx=True, px=round(self._flight_ttl * 1000))
        except Unavailable as exc:
            self._failed(exc)
            return await self._load_and_set(key, load, ttl)
        if first:
            try:
                return await self._load_and_set(key, load, ttl)
            finally:
                try:
                    await self._unlock(keys=[lock], args=[token])
                except Unavailable as exc:
                    self._failed(exc)  # the lock expires on its own
        deadline = time.monotonic() + self._flight_ttl
        while time.monotonic() < deadline:
            await asyncio.sleep(self._flight_poll)
            try:
                pipe = self._client.pipeline(transaction=False)
                pipe.get(self._key(key))
                pipe.exists(lock)
                raw, flying = await pipe.execute()
            except Unavailable as exc:
                self._failed(exc)
                break
            if raw is not None:
                value: tuple[Any] = pickle.loads(raw)
                return value
            if not flying:
                break
        return await self._load_and_set(key, load, ttl)

    async def _load_and_set(
        self, key: str, load: Callable[[], Awaitable[tuple[Any]]], ttl: float | None
    ) -> tuple[Any]:
        value = await load()
        await self.set(key, value, ttl=ttl)
        return value

    async def close(self) -> None:
        """Close the client if this backend created it."""
        if self._owns_client:
            await self._client.aclose()

    # -- Redis unreachable: a miss, tried again after retry_after ------------------------

    def _skipping(self) -> bool:
        return self._down and time.monotonic() < self._down_until

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._down_until = time.monotonic() + self._retry_after
        if not self._down:
            self._down = True
            name = type(exc).__name__
            _log.warning("shared cache unavailable, loading instead: %s: %s", name, exc)

    def _ok(self) -> None:
        if self._down:
            self._down = False
            _log.info("shared cache is back")
