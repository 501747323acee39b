"""The Redis primitives (lease, fencing, watcher, shared cache) against a real
``redis-server`` on a loopback port: no mocks, several processes where it matters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from quart_service import ServiceCache
from quart_service.coordination.redis import (
    RedisLease,
    SnapshotStore,
    SnapshotWatcher,
    Unavailable,
    connect,
)
from quart_service.coordination.redis_cache import RedisCacheBackend

from .support.redis import running_redis
from .support.server import ROOT, free_port, server_env

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = connect(redis_url)
    try:
        yield redis
    finally:
        await redis.aclose()


# -- a separate process per simulated host -------------------------------------------


class Actor:
    """tests/support/redis_actor.py in its own process: one command, one JSON answer."""

    def __init__(self, url: str, ttl: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.redis_actor", url, str(ttl)],
            cwd=ROOT,
            env=server_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.token = self._read()["token"]

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"actor {self.process.pid} exited {self.process.poll()}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # in case a test left it stopped
            self.process.kill()
        self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def actors(url: str, count: int, ttl: float) -> Iterator[list[Actor]]:
    started: list[Actor] = []
    try:
        for _ in range(count):
            started.append(Actor(url, ttl))
        yield started
    finally:
        for actor in started:
            actor.stop()


# -- the lease ---------------------------------------------------------------------------


def test_one_holder_among_three_processes_and_renewal_keeps_it(redis_url: str) -> None:
    # TTL 0.6 s over 3 s of contention: the winner keeps it only by renewing (every 0.2 s).
    with actors(redis_url, 3, ttl=0.6) as hosts:
        start = time.time() + 1.0
        for host in hosts:
            host.send(f"contend 3.0 {start}")
        results = [host._read() for host in hosts]
    winners = [r for r in results if r["acquired"]]
    assert len(winners) == 1, results
    assert winners[0]["acquired"] == 1, results  # never lost it, never re-took it
    assert winners[0]["held_at_end"], results
    assert winners[0]["held_for"] > 2.5, results


async def test_renewal_keeps_the_lease_past_its_ttl(client: Redis) -> None:
    lease = RedisLease(client, ttl=0.5)
    other = RedisLease(client, ttl=0.5)
    assert lease.renew_every == pytest.approx(0.5 / 3)
    assert await lease.try_acquire()
    keeper = asyncio.create_task(lease.keep())
    for _ in range(8):  # 1.6 s, more than three TTLs
        await asyncio.sleep(0.2)
        assert lease.held
        assert not await other.try_acquire()
    assert 0 < await client.pttl(lease.key) <= 500
    keeper.cancel()
    assert await lease.release()
    assert not lease.held
    assert await other.try_acquire()


async def test_a_holder_that_stops_renewing_loses_it(client: Redis) -> None:
    lease = RedisLease(client, ttl=0.3)
    assert await lease.try_acquire()
    await asyncio.sleep(0.4)
    assert not lease.held  # it knows without asking Redis
    other = RedisLease(client, ttl=0.3)
    assert await other.try_acquire()
    assert not await lease.renew()
    assert not await lease.try_acquire()
    assert await other.release()
    assert await lease.try_acquire()  # free again: taken, though it had lost it before


def test_a_paused_leader_loses_the_lease_and_is_fenced_off(redis_url: str) -> None:
    async def scenario(paused: Actor) -> None:
        redis = connect(redis_url)
        try:
            store = SnapshotStore(redis)
            # The new leader, once the paused one's TTL (1 s) has run out.
            await asyncio.sleep(1.3)
            lease = RedisLease(redis, ttl=1.0)
            assert await lease.try_acquire()
            generation = await store.next_generation()
            assert await store.publish(generation, "from the new leader", lease=lease)
        finally:
            await redis.aclose()

    with actors(redis_url, 1, ttl=1.0) as (old,):
        assert old.ask("acquire") == {"ok": True}
        assert old.ask("keep") == {"ok": True}
        stale_generation = old.ask("next")["generation"]
        os.kill(old.process.pid, signal.SIGSTOP)  # a GC pause, a VM migration...
        try:
            asyncio.run(scenario(old))
        finally:
            os.kill(old.process.pid, signal.SIGCONT)
        # It wakes up believing nothing happened, and publishes what it had computed.
        assert old.ask(f"publish {stale_generation} from the old leader") == {"ok": False}
        # Even with a fresh generation it cannot: the lease is checked in the same script.
        fresh = old.ask("next")["generation"]
        assert fresh > stale_generation
        assert old.ask(f"publish_leased {fresh} from the old leader") == {"ok": False}
        assert old.ask("held") == {"ok": False}
        assert old.ask("renew") == {"ok": False}

    async def check() -> None:
        redis = connect(redis_url)
        try:
            generation, payload = await SnapshotStore(redis).current()
        finally:
            await redis.aclose()
        assert generation == stale_generation + 1
        assert payload == "from the new leader"

    asyncio.run(check())


async def test_a_redis_outage_ends_the_lease_and_it_comes_back(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as server:
        client = connect(server.url, timeout=0.2)
        try:
            lease = RedisLease(client, ttl=1.0)
            assert await lease.try_acquire()
            keeper = asyncio.create_task(lease.keep())
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.stop)
            stopped = time.monotonic()
            await asyncio.wait_for(keeper, timeout=3)  # returns; does not raise
            assert not lease.held
            assert time.monotonic() - stopped < 1.2  # within the TTL (plus a try)
            with pytest.raises(Unavailable):
                await lease.try_acquire()
            await asyncio.to_thread(server.start)
            assert await lease.try_acquire()  # back without a new client
            assert lease.held
        finally:
            await client.aclose()


async def test_release_by_a_non_owner_does_nothing(client: Redis) -> None:
    owner, other = RedisLease(client, ttl=5), RedisLease(client, ttl=5)
    assert await owner.try_acquire()
    assert not await other.release()
    assert not await other.renew()
    assert await client.get(owner.key) == owner.token.encode()
    assert await owner.renew()


async def test_tasks_of_one_loop_each_with_its_own_lease(client: Redis) -> None:
    # Pitfall 13: redis-py's Lock keeps its token thread-local, and every task of a
    # loop is on one thread. Each RedisLease carries its own token instead.
    leases = [RedisLease(client, ttl=5) for _ in range(8)]
    won = await asyncio.gather(*[lease.try_acquire() for lease in leases])
    assert sum(won) == 1
    winner = leases[won.index(True)]
    losers = [lease for lease in leases if lease is not winner]
    assert not any(await asyncio.gather(*[lease.release() for lease in losers]))
    assert not any(await asyncio.gather(*[lease.renew() for lease in losers]))
    assert not any(lease.held for lease in losers)
    assert await winner.renew()
    assert await client.get(winner.key) == winner.token.encode()


async def test_redis_py_lock_shared_by_tasks_lets_one_release_the_others(client: Redis) -> None:
    # The upstream behaviour the lease avoids (docs/design.md, pitfall 13).
    lock = client.lock("quart_service:pitfall13", timeout=5)

    async def holder() -> bool:
        return bool(await lock.acquire(blocking=False))

    async def intruder() -> None:
        await lock.release()  # another task, same thread: the token is "its" token

    assert await asyncio.create_task(holder())
    await asyncio.create_task(intruder())
    assert await client.get("quart_service:pitfall13") is None


# -- fencing ---------------------------------------------------------------------------


async def test_publish_is_fenced_by_generation(client: Redis) -> None:
    store = SnapshotStore(client)
    assert await store.current() == (0, None)
    first, second = await store.next_generation(), await store.next_generation()
    assert second == first + 1
    assert await store.publish(second, "second")
    assert not await store.publish(first, "first, late")
    assert not await store.publish(second, "second again")
    assert await store.current() == (second, "second")
    # A Redis that restarted empty: the floor keeps generations growing.
    await client.delete(store.counter_key)
    assert await store.next_generation(after=second) == second + 1


async def test_keys_live_under_the_prefix(client: Redis) -> None:
    ours, theirs = SnapshotStore(client, prefix="a"), SnapshotStore(client, prefix="b")
    assert await ours.publish(await ours.next_generation(), "a's")
    assert await theirs.current() == (0, None)
    lease_a, lease_b = RedisLease(client, prefix="a"), RedisLease(client, prefix="b")
    assert await lease_a.try_acquire()
    assert await lease_b.try_acquire()
    assert sorted(await client.keys("*")) == [
        b"a:generation",
        b"a:leader",
        b"a:snapshot",
        b"a:snapshot_generation",
        b"b:leader",
    ]


# -- the watcher ------------------------------------------------------------------------


async def _collect(watcher: SnapshotWatcher, into: list[int]) -> None:
    async for generation in watcher:
        into.append(generation)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _eventually(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def test_the_watcher_sees_every_generation_and_never_goes_back(client: Redis) -> None:
    store = SnapshotStore(client)
    assert await store.publish(await store.next_generation(), "before")  # generation 1
    watcher = SnapshotWatcher(client)
    seen: list[int] = []
    task = asyncio.create_task(_collect(watcher, seen))
    try:
        await _eventually(lambda: seen == [1], "the catch-up read at subscription")
        for _ in range(20):
            assert await store.publish(await store.next_generation(), "x")
        await _eventually(lambda: len(seen) == 21, "20 publications")
        assert seen == list(range(1, 22))
        await client.publish(store.channel, "5")  # an old or replayed message
        await client.publish(store.channel, "not a number")
        assert await store.publish(await store.next_generation(), "y")
        await _eventually(lambda: len(seen) == 22, "the next one")
        assert seen[-1] == 22
    finally:
        await _stop(task)


async def test_a_watcher_cancelled_while_it_connects_always_stops(client: Redis) -> None:
    """A stopping worker cancels its watcher, sometimes while redis-py is still setting
    up the subscription. On Python 3.11 redis-py's ``asyncio.wait_for`` could swallow
    that cancellation (python/cpython#86296) and the watcher looped on: about half of
    these cancellations never ended, and the worker never exited."""
    delays = [0.0005 * (i % 6) for i in range(60)]  # 0-2.5 ms after the start
    for delay in delays:
        task = asyncio.create_task(_collect(SnapshotWatcher(client), []))
        await asyncio.sleep(delay)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)
        assert done, f"a watcher cancelled {delay * 1000:.1f} ms after it started never stopped"
        assert task.cancelled() or task.exception() is None


async def test_the_watcher_survives_a_killed_connection(client: Redis) -> None:
    store = SnapshotStore(client)
    watcher = SnapshotWatcher(client, backoff=0.05)
    seen: list[int] = []
    task = asyncio.create_task(_collect(watcher, seen))
    try:
        await _eventually(lambda: watcher.connected, "subscribed")
        assert await client.client_kill_filter(_type="pubsub") == 1
        assert await store.publish(await store.next_generation(), "after the kill")
        await _eventually(lambda: seen == [1], "the publication after the kill")
        await _eventually(lambda: watcher.connected, "subscribed again")
        assert await store.publish(await store.next_generation(), "and the next")
        await _eventually(lambda: seen == [1, 2], "the one after")
    finally:
        await _stop(task)


async def test_the_fallback_read_finds_a_lost_message(client: Redis) -> None:
    store = SnapshotStore(client)
    watcher = SnapshotWatcher(client, fallback_every=0.3)
    seen: list[int] = []
    task = asyncio.create_task(_collect(watcher, seen))
    try:
        await _eventually(lambda: watcher.connected, "subscribed")
        await client.set(store.generation_key, 7)  # stored, never announced
        set_at = time.monotonic()
        await _eventually(lambda: seen == [7], "the fallback read", timeout=2)
        # Found by the periodic read (no message was published), within one period.
        assert time.monotonic() - set_at <= watcher.fallback_every + 0.5
        assert watcher.last == 7
        assert await client.pubsub_numsub(store.channel) == [(store.channel.encode(), 1)]
    finally:
        await _stop(task)


async def test_the_watcher_catches_up_after_redis_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "quart_service.coordination")
    with running_redis(tmp_path / "redis", port=free_port()) as server:
        watching = connect(server.url)
        watcher = SnapshotWatcher(watching, backoff=0.2, max_backoff=2.0, fallback_every=30)
        seen: list[int] = []
        task = asyncio.create_task(_collect(watcher, seen))
        try:
            publisher = connect(server.url)
            store = SnapshotStore(publisher)
            await _eventually(lambda: watcher.connected, "subscribed")
            assert await store.publish(await store.next_generation(), "one")
            await _eventually(lambda: seen == [1], "generation 1")

            await asyncio.to_thread(server.stop)
            await _eventually(lambda: not watcher.connected, "the watcher noticing")
            await asyncio.sleep(1.0)  # a few failed reconnections (0.2, 0.4, 0.8 s apart)
            await asyncio.to_thread(server.start)  # empty: no persistence
            # Published while the watcher waits for its next try (1.6 s backoff by now).
            generation = await store.next_generation(after=watcher.last)
            assert await store.publish(generation, "two")
            assert not watcher.connected, "reconnected before the publication: no catch-up"
            await _eventually(lambda: seen == [1, 2], "the catch-up after reconnecting")
            assert watcher.reconnects == 1
            await publisher.aclose()
        finally:
            await _stop(task)
            await watching.aclose()
    lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
    back = [r for r in caplog.records if "Redis is back" in r.getMessage()]
    assert (len(lost), len(back)) == (1, 1), [r.getMessage() for r in caplog.records]


# -- the shared cache -------------------------------------------------------------------


async def test_the_cache_backend_round_trips_and_clears_by_namespace(client: Redis) -> None:
    cache = RedisCacheBackend(client)
    assert await cache.get("g1:a") is None
    assert await cache.set("g1:a", ({"x": [1, 2]},), ttl=10)
    assert await cache.set("g1:none", (None,))
    assert await cache.set("g2:a", ("two",))
    assert await cache.set("d:flags@1,models@2:a", ("d",))
    assert await cache.set("a[1]*?:k", ("glob",))
    assert await cache.get("g1:a") == ({"x": [1, 2]},)
    assert await cache.get("g1:none") == (None,)
    assert 0 < await client.pttl(cache.key_prefix + "g1:a") <= 10_000
    assert await client.pttl(cache.key_prefix + "g1:none") == -1
    await cache.set("short", (1,), ttl=0.2)
    await asyncio.sleep(0.3)
    assert await cache.get("short") is None
    assert await cache.delete("g1:none") == 1
    await client.set("quart_service:leader", "someone")  # not the cache's

    await cache.clear(namespace="g1:")
    assert await cache.get("g1:a") is None
    assert await cache.get("g2:a") == ("two",)
    await cache.clear(namespace="a[1]*?:")  # glob characters are literal
    assert await cache.get("a[1]*?:k") is None
    assert await cache.get("d:flags@1,models@2:a") == ("d",)
    values = await asyncio.gather(*[cache.get("g2:a") for _ in range(300)])
    assert values == [("two",)] * 300
    await cache.clear()
    assert await client.keys("*") == [b"quart_service:leader"]


async def test_service_cache_over_redis(client: Redis) -> None:
    scope = "s1"
    cache = ServiceCache(60, lambda: scope, backend=RedisCacheBackend(client))
    calls = 0

    async def load() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"calls": calls}

    values = await asyncio.gather(*[cache.get_or_load("k", load) for _ in range(50)])
    assert values == [{"calls": 1}] * 50
    assert calls == 1
    other = ServiceCache(60, lambda: scope, backend=RedisCacheBackend(client))
    assert await other.get_or_load("k", load) == {"calls": 1}  # another worker: a hit
    scope = "s2"
    assert await cache.get_or_load("k", load) == {"calls": 2}
    # Shared entries are left to their TTL: a host that has not swapped yet may still
    # read the old scope, and a scan per swap per worker would cost more than memory.
    assert await cache.retire("s2", {}) == 0
    assert await client.exists("quart_service:cache:s1:k") == 1
    assert await client.exists("quart_service:cache:s2:k") == 1
    assert 0 < await client.ttl("quart_service:cache:s1:k") <= 60


async def test_a_failed_flight_lets_the_waiting_process_load(client: Redis) -> None:
    # Two workers of two hosts (two backends, as two processes would have).
    first = ServiceCache(60, lambda: "s1", backend=RedisCacheBackend(client, single_flight=True))
    second = ServiceCache(60, lambda: "s1", backend=RedisCacheBackend(client, single_flight=True))

    async def failing() -> str:
        await asyncio.sleep(0.2)
        raise RuntimeError("database away")

    async def working() -> str:
        return "loaded by the second"

    async def second_later() -> str:
        await asyncio.sleep(0.05)  # the first holds the flight lock by now
        return await second.get_or_load("k", working)

    outcome = await asyncio.gather(
        first.get_or_load("k", failing), second_later(), return_exceptions=True
    )
    assert isinstance(outcome[0], RuntimeError)
    assert outcome[1] == "loaded by the second"
    assert second.loads.as_dict() == {"ok": 1}
    assert await client.keys("quart_service:cacheflight:*") == []


async def test_an_unreachable_cache_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    nowhere = connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    cache = RedisCacheBackend(nowhere, retry_after=60)
    try:
        assert await cache.get("k") is None
        assert not await cache.set("k", (1,))
        assert await cache.get("k") is None  # not tried again for retry_after
        assert cache.errors == 1
    finally:
        await nowhere.aclose()
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


@pytest.mark.parametrize(("flight", "loads"), [("", [1, 1, 1]), ("shared", [0, 0, 1])])
def test_three_hosts_missing_one_key(redis_url: str, flight: str, loads: list[int]) -> None:
    # 50 concurrent misses in each of 3 processes: single flight per process by
    # default (3 loads); with the backend's single_flight, one load in the cluster.
    with actors(redis_url, 3, ttl=5) as hosts:
        start = time.time() + 1.0
        for host in hosts:
            host.send(f"cache shared-key 50 {start} {flight}")
        results = [host._read() for host in hosts]

    async def total() -> int:
        redis = connect(redis_url)
        try:
            return int(await redis.get("loads:shared-key") or 0)
        finally:
            await redis.aclose()

    assert sorted(r["loads"] for r in results) == loads, results
    assert asyncio.run(total()) == sum(loads)
    assert all(r["values"] == ["value of shared-key"] for r in results)
