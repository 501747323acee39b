"""The cluster's change feed through Redis: one statement per interval for all hosts.

With ``coordination_url`` set, the refresh has two levels::

    cluster leader (the worker holding the Redis lease, one per cluster):
        every refresh_interval: SELECT table_name, revision FROM table_revisions
        moved, or the database failed / recovered?
            generation = INCR;  publish {revisions, failing_since, ...} fenced by
            generation and lease;  PUBLISH generation
    host leader (the worker holding its host's flock, one per host):
        watches the channel (+ catch-up reads), and on a new generation loads the
        datasets whose tables moved into its host's files, as a single host does
    every worker: follows its host's manifest file, as a single host does

So the database sees one statement per interval for the whole cluster while nothing
changes, and one load per changed dataset per host when something does. A leader
that lost its lease cannot publish (the fence is checked in the same Redis script),
so two leaders never publish the same or an older generation. While Redis cannot be
reached, every host keeps serving what it has; the feed reports it and catches up
when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from ..cancelling import pause, stop
from ..coordination.redis import RedisLease, SnapshotStore, SnapshotWatcher, Unavailable
from ..observability.metrics import Count

__all__ = ["ClusterFeed", "ClusterState", "Poll"]

_log = logging.getLogger("quart_service.data")

#: Reads every table's revision (one statement); raises when the database fails.
Poll = Callable[[], Awaitable[Mapping[str, int]]]


@dataclass(frozen=True, slots=True)
class ClusterState:
    """What the cluster leader published: the revisions, and the database's health."""

    generation: int
    revisions: dict[str, int]
    checked_at: float | None
    failing_since: float | None = None
    error: str | None = None
    leader: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "revisions": self.revisions,
                "checked_at": self.checked_at,
                "failing_since": self.failing_since,
                "error": self.error,
                "leader": self.leader,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, generation: int, text: str) -> ClusterState:
        data = json.loads(text)
        return cls(
            generation,
            {str(k): int(v) for k, v in data["revisions"].items()},
            data.get("checked_at"),
            data.get("failing_since"),
            data.get("error"),
            str(data.get("leader", "")),
        )


@dataclass
class _Redis:
    """Whether this worker reaches Redis, and since when it does not."""

    connected: bool = True
    since: float | None = None
    error: str | None = None

    def up(self) -> None:
        if not self.connected:
            _log.info("Redis is reachable again after %.1f s", time.time() - (self.since or 0))
        self.connected, self.since, self.error = True, None, None

    def down(self, exc: BaseException) -> None:
        if self.connected:
            _log.warning("Redis cannot be reached, serving the data we have: %s", exc)
            self.since = time.time()
        self.connected, self.error = False, f"{type(exc).__name__}: {exc}"


class ClusterFeed:
    """Run by a host leader: competes for the cluster lease (and polls the database
    while it holds it), and watches what the cluster leader publishes."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        interval: float,
        lease_ttl: float,
        poll: Poll,
        leader_changes: Count | None = None,
    ) -> None:
        self.interval = interval
        self._client = client
        self._prefix = prefix
        self._poll = poll
        self._lease = RedisLease(client, prefix=prefix, ttl=lease_ttl)
        self._store = SnapshotStore(client, prefix=prefix)
        self._leader_changes = leader_changes or Count()
        self.latest: ClusterState | None = None
        self.redis = _Redis()
        self._published: ClusterState | None = None

    @property
    def leading(self) -> bool:
        """Whether this worker is the cluster leader now."""
        return bool(self._lease.held)

    def health(self) -> dict[str, Any]:
        """For ``refresh.json``, ``/readyz`` and ``/debug/identity``."""
        return {
            "backend": "redis",
            "connected": self.redis.connected,
            "unreachable_since": self.redis.since,
            "error": self.redis.error,
            "cluster_leader": self.leading,
            "generation": self.latest.generation if self.latest else 0,
        }

    async def run(self) -> None:
        """Lead when possible, and watch, until cancelled."""
        watch = asyncio.get_running_loop().create_task(self._watch())
        try:
            await self._lead()
        finally:
            await stop(watch, "the cluster snapshot watcher")
            if self._lease.held:
                with contextlib.suppress(*Unavailable):  # it expires by itself
                    await self._lease.release()

    # -- the cluster leader ------------------------------------------------------------

    async def _lead(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = next_try = 0.0
        tick = min(max(self.interval / 5, 0.02), 0.25)
        renew_at = 0.0
        while True:
            reached = False  # whether this turn spoke to Redis (and it answered)
            try:
                if not self._lease.held:
                    if loop.time() >= next_try:
                        next_try = loop.time() + self.interval  # contenders: once an interval
                        acquired = await self._lease.try_acquire()
                        reached = True
                        if acquired:
                            self._leader_changes.inc()
                            _log.info("worker %d is now the cluster's refresh leader", os.getpid())
                            next_poll = 0.0
                            renew_at = loop.time() + self._lease.renew_every
                elif loop.time() >= renew_at:
                    renewed = await self._lease.renew()
                    reached = True
                    if renewed:
                        renew_at = loop.time() + self._lease.renew_every
                    else:
                        _log.warning("worker %d lost the cluster lease", os.getpid())
                if self._lease.held and loop.time() >= next_poll:
                    await self._poll_and_publish()
                    next_poll = loop.time() + self.interval
                if reached:
                    self.redis.up()
            except Unavailable as exc:
                self.redis.down(exc)
            await pause(tick)

    async def _poll_and_publish(self) -> None:
        previous = self._published or self.latest
        try:
            revisions = dict(await self._poll())
        except Exception as exc:  # the database's trouble (Redis errors come later)
            error = f"{type(exc).__name__}: {exc}"
            since = previous.failing_since if previous and previous.failing_since else time.time()
            state = ClusterState(
                0,
                dict(previous.revisions) if previous else {},
                previous.checked_at if previous else None,
                since,
                error,
                self._lease.token,
            )
        else:
            state = ClusterState(0, revisions, time.time(), None, None, self._lease.token)
        if previous is not None and _same(previous, state):
            return
        generation = await self._store.next_generation(
            after=max(
                previous.generation if previous else 0,
                self.latest.generation if self.latest else 0,
            )
        )
        if await self._store.publish(generation, state.to_json(), lease=self._lease):
            self._published = dataclasses.replace(state, generation=generation)
            _log.info("published cluster generation %d (leader %s)", generation, self._lease.token)
        else:
            # Fenced off: another leader published a newer generation; stop leading.
            await self._lease.release()

    # -- every host leader -------------------------------------------------------------

    async def _watch(self) -> None:
        watcher = SnapshotWatcher(
            self._client, prefix=self._prefix, fallback_every=max(self.interval * 4, 1.0)
        )
        async for generation in watcher:
            try:
                stored, payload = await self._store.current()
            except Unavailable as exc:
                self.redis.down(exc)
                continue
            if payload is None or stored < generation:
                continue
            self.latest = ClusterState.from_json(stored, payload)


def _same(a: ClusterState, b: ClusterState) -> bool:
    return (a.revisions, a.failing_since, a.error) == (b.revisions, b.failing_since, b.error)
