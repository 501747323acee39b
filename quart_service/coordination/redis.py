"""Coordination between hosts through Redis: a lease, fenced snapshots, a watcher.

Three building blocks on ``redis.asyncio`` (the optional ``redis`` extra), every key
under one prefix (default ``quart_service``) so several deployments can share a Redis:

* :class:`RedisLease` — one leader per cluster. ``SET <prefix>:leader <token> NX PX
  ttl`` takes it; renewal and release run Lua scripts that act only if the key still
  holds this object's token. The token lives on the object (never in a thread-local:
  redis-py's ``Lock`` keeps it thread-local by default, docs/design.md pitfall 13).
* :class:`SnapshotStore` — fencing. ``next_generation()`` is ``INCR
  <prefix>:generation``; ``publish()`` stores a payload only if its generation is
  greater than the stored one (and, given the lease, only if the lease is still this
  holder's), in one script that also ``PUBLISH``-es the generation. A leader that lost
  its lease cannot overwrite a newer snapshot.
* :class:`SnapshotWatcher` — notification. Subscribes to ``<prefix>:snapshots`` and
  yields each new generation; pub/sub delivers at most once, so it also reads the
  stored generation after every (re)subscription and every ``fallback_every``
  seconds. It never yields a generation lower than or equal to one it yielded, and it
  reconnects with backoff when Redis goes away.

What Redis does not give: a lease is a timeout, not a guarantee: a holder paused
longer than its TTL still *believes* it leads until it next looks (:attr:`RedisLease.held`
turns False on its own when the TTL has passed without a renewal, measured from the
moment the last successful command was sent). The fence in :meth:`SnapshotStore.publish`
is what keeps such a holder from overwriting newer data. Redis without persistence
forgets the generation counter when it restarts: pass the highest generation you know
to :meth:`SnapshotStore.next_generation` (``after=``) so generations keep growing.

Create clients with :func:`connect`: it turns off redis-py's own retries (an error
must surface at once, so a lease is not renewed late and a watcher notices that it
must catch up) and bounds every socket operation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..cancelling import pause, raise_if_cancelling

__all__ = [
    "DEFAULT_PREFIX",
    "RedisLease",
    "SnapshotStore",
    "SnapshotWatcher",
    "Unavailable",
    "connect",
]

_log = logging.getLogger("quart_service.coordination")

#: The key prefix when none is given.
DEFAULT_PREFIX = "quart_service"

#: The errors that mean "Redis cannot be reached now" (as opposed to a bad command).
Unavailable: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
)


def connect(
    url: str, *, timeout: float = 1.0, max_connections: int = 32, retries: int = 1
) -> Redis:
    """A client for ``url`` built for coordination: every socket operation bounded by
    ``timeout``; ``retries`` immediate retries (1: a pooled connection that Redis
    closed when it restarted is replaced at once; no backoff, so a lease renewal fails
    within ``(retries + 1) * timeout``); a pool of ``max_connections`` that waits up to
    ``timeout`` for a free connection (redis-py's default pool raises
    ``MaxConnectionsError`` at once when it is exhausted)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), retries),
        # Named as well: redis-py 5 ignores ``retry`` without it.
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        decode_responses=False,
    )
    return Redis.from_pool(pool)


# -- the lease -------------------------------------------------------------------------

# KEYS[1] the lease; ARGV[1] the token, ARGV[2] the TTL in milliseconds.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] the lease; ARGV[1] the token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLease:
    """A lease on ``<prefix>:<name>`` that one holder at a time has for ``ttl`` seconds.

    ``try_acquire()`` takes it if free; ``renew()`` (every :attr:`renew_every`, a
    third of the TTL by default) keeps it; ``release()`` gives it up. ``renew()``
    returning False means another holder may have it: stop publishing at once.
    Each object has its own token, so two objects never share ownership, whether
    they live in two processes or in two tasks of one event loop. Use one object per
    process that competes.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        name: str = "leader",
        ttl: float = 10.0,
        renew_every: float | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._client = client
        self.key = f"{prefix}:{name}"
        self.ttl = ttl
        self.renew_every = ttl / 3 if renew_every is None else renew_every
        if not 0 < self.renew_every < ttl:
            raise ValueError("renew_every must be positive and shorter than ttl")
        # Who holds it, readable by an operator (GET <prefix>:leader); unique per object.
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self._valid_until: float | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    @property
    def held(self) -> bool:
        """Whether this object holds the lease, as far as it knows: it was acquired or
        renewed less than ``ttl`` ago (counted from when that command was sent)."""
        return self._valid_until is not None and _now() < self._valid_until

    async def try_acquire(self) -> bool:
        """Take the lease if it is free (``SET NX PX``); renew it if this object holds
        it already. Never waits for another holder. Raises an :data:`Unavailable`
        error if Redis cannot be reached."""
        if self._valid_until is not None and await self.renew():
            return True
        sent = _now()
        taken = await self._client.set(self.key, self.token, nx=True, px=self._ttl_ms)
        if taken:
            self._valid_until = sent + self.ttl
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease by ``ttl`` if this object still holds it. False: it does
        not (it expired and maybe someone else took it): stop acting as the leader.
        An :data:`Unavailable` error leaves :attr:`held` to run out at its deadline."""
        sent = _now()
        renewed = await self._renew(keys=[self.key], args=[self.token, self._ttl_ms])
        if renewed:
            self._valid_until = sent + self.ttl
            return True
        self._valid_until = None
        return False

    async def release(self) -> bool:
        """Give the lease up if this object holds it (a no-op otherwise: never deletes
        another holder's lease). True if a lease was deleted."""
        self._valid_until = None
        released = await self._release(keys=[self.key], args=[self.token])
        return bool(released)

    async def keep(self) -> None:
        """Renew every :attr:`renew_every` seconds; return as soon as the lease is lost
        (refused renewal, or Redis unreachable until the TTL ran out). Run it as a task
        next to the leader's work and stop publishing when it returns."""
        while self.held:
            await pause(min(self.renew_every, self._left()))
            if not self.held:
                break
            try:
                if not await self.renew():
                    break
            except Unavailable as exc:
                _log.debug("lease renewal failed, retrying until it expires: %s", exc)
        self._valid_until = None

    def _left(self) -> float:
        return max(0.0, (self._valid_until or 0.0) - _now())


# -- fenced snapshots ------------------------------------------------------------------

# KEYS[1] the generation counter. ARGV[1] a floor: the result is above it.
_NEXT_GENERATION = """
local generation = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if generation <= floor then
    generation = floor + 1
    redis.call('SET', KEYS[1], generation)
end
return generation
"""

# KEYS[1] snapshot_generation, KEYS[2] snapshot, KEYS[3] (optional) the lease.
# ARGV[1] generation, ARGV[2] payload, ARGV[3] channel, ARGV[4] (optional) lease token.
# Returns 1 published, 0 fenced off by a newer generation, -1 fenced off by the lease.
_PUBLISH = """
if #KEYS == 3 and redis.call('GET', KEYS[3]) ~= ARGV[4] then
    return -1
end
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
local generation = tonumber(ARGV[1])
if generation <= stored then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""


class SnapshotStore:
    """The cluster's current snapshot (a generation and a text payload), fenced.

    Keys: ``<prefix>:generation`` (the counter), ``<prefix>:snapshot_generation`` and
    ``<prefix>:snapshot`` (what was last published), channel ``<prefix>:snapshots``.
    """

    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._client = client
        self.counter_key = f"{prefix}:generation"
        self.generation_key = f"{prefix}:snapshot_generation"
        self.payload_key = f"{prefix}:snapshot"
        self.channel = f"{prefix}:snapshots"
        self._next = client.register_script(_NEXT_GENERATION)
        self._publish = client.register_script(_PUBLISH)

    async def next_generation(self, after: int = 0) -> int:
        """A new generation (``INCR``), greater than ``after``: pass the highest one
        you know, so a Redis that restarted empty does not hand out old numbers."""
        return int(await self._next(keys=[self.counter_key], args=[after]))

    async def publish(
        self, generation: int, payload: str, *, lease: RedisLease | None = None
    ) -> bool:
        """Store ``payload`` as ``generation`` and announce it, only if ``generation``
        is greater than the stored one — and, given ``lease``, only while the lease is
        still that object's (checked in the same script). False: fenced off, nothing
        was written; a leader that sees False has been superseded."""
        keys = [self.generation_key, self.payload_key]
        args: list[str | int] = [generation, payload, self.channel]
        if lease is not None:
            keys.append(lease.key)
            args.append(lease.token)
        outcome = int(await self._publish(keys=keys, args=args))
        if outcome < 0:
            _log.warning("generation %d not published: the lease is not ours", generation)
        elif outcome == 0:
            _log.warning("generation %d not published: a newer one is stored", generation)
        return outcome > 0

    async def current(self) -> tuple[int, str | None]:
        """The last published generation and payload (one ``MGET``, so the two
        match); ``(0, None)`` before any. The catch-up read."""
        raw_generation, raw_payload = cast(
            "list[bytes | None]",
            await self._client.mget([self.generation_key, self.payload_key]),
        )
        generation = int(raw_generation) if raw_generation else 0
        payload = raw_payload.decode("utf-8") if raw_payload is not None else None
        return generation, payload

    async def current_generation(self) -> int:
        """Just the last published generation (one ``GET``)."""
        raw = await self._client.get(self.generation_key)
        return int(raw) if raw else 0


# -- notification ----------------------------------------------------------------------


class SnapshotWatcher:
    """New snapshot generations, as an async iterator::

        watcher = SnapshotWatcher(connect(url), start_after=my_generation)
        async for generation in watcher:
            ...  # read SnapshotStore.current() (or the payload) and swap

    Each yielded generation is greater than every one before (at most once each;
    several publications between two reads are seen as the latest). Sources: the
    channel, a read of the stored generation right after each (re)subscription, and
    one every ``fallback_every`` seconds (pub/sub drops messages while a subscriber
    is disconnected) — including when redis-py reconnected and resubscribed on its
    own. While Redis is unreachable it retries with backoff (``backoff``
    doubling up to ``max_backoff``), logging once when it loses Redis and once when
    it is back. :attr:`connected` says which state it is in.

    Costs per watcher: two connections (the subscription, and one for reads) and one
    ``GET`` per ``fallback_every`` while idle.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        start_after: int = 0,
        fallback_every: float = 5.0,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self._client = client
        self._store = SnapshotStore(client, prefix=prefix)
        self.last = start_after
        self.fallback_every = fallback_every
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._state: bool | None = None  # unknown until the first try
        self._ever_connected = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Whether the watcher is subscribed now."""
        return bool(self._state)

    def __aiter__(self) -> AsyncIterator[int]:
        return self.generations()

    async def generations(self) -> AsyncIterator[int]:
        """Yield each new generation until the consumer stops iterating."""
        backoff = self._backoff
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self._store.channel)
                    next_check = loop.time() + self.fallback_every
                    while True:
                        # No pause in this loop: every turn awaits redis-py.
                        raise_if_cancelling(task)
                        wait = max(0.0, next_check - loop.time())
                        message = await pubsub.get_message(timeout=wait)
                        if message is not None and message.get("type") == "subscribe":
                            # Subscribed (first, or again after redis-py reconnected by
                            # itself): read what was published while not subscribed.
                            seen = await self._store.current_generation()
                            self._set_connected(True)
                            backoff = self._backoff
                        elif message is not None:
                            seen = _generation_of(message)
                        elif loop.time() >= next_check:
                            seen = await self._store.current_generation()
                        else:
                            continue
                        if loop.time() >= next_check:
                            next_check = loop.time() + self.fallback_every
                        if seen > self.last:
                            self.last = seen
                            yield seen
            except Unavailable as exc:
                self._set_connected(False, exc)
                await pause(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    def _set_connected(self, connected: bool, exc: BaseException | None = None) -> None:
        if connected == self._state:
            return
        self._state = connected
        if connected:
            if self._ever_connected:
                self.reconnects += 1
                _log.info("snapshot watcher: Redis is back, caught up at %d", self.last)
            self._ever_connected = True
        else:
            _log.warning(
                "snapshot watcher: lost Redis (%s: %s); serving generation %d, retrying",
                type(exc).__name__,
                exc,
                self.last,
            )


def _generation_of(message: dict[str, Any]) -> int:
    if message.get("type") != "message":
        return 0
    try:
        return int(message["data"])
    except (KeyError, TypeError, ValueError):
        return 0


def _now() -> float:
    # CLOCK_MONOTONIC keeps counting while the process is stopped (SIGSTOP), so a
    # holder paused past its TTL sees at once that it no longer holds the lease.
    return time.monotonic()
