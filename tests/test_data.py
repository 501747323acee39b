"""The data plane's parts in process: migrations, files, lock, cache."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from quart_service import ServiceCache
from quart_service.coordination import LeaderLock, PublishedFile
from quart_service.data.sqlite import SQLiteDatabase, private_database


def _sqlite_threads() -> set[threading.Thread]:
    """aiosqlite's one thread per connection, alive now."""
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


def test_published_file_is_noticed_once_per_change(tmp_path: Path) -> None:
    writer = PublishedFile(tmp_path / "snap.json")
    reader = PublishedFile(tmp_path / "snap.json")
    assert reader.read_if_changed() is None
    writer.publish("one")
    assert reader.read_if_changed() == "one"
    assert reader.read_if_changed() is None
    writer.publish("two")
    assert reader.read_if_changed() == "two"


def test_leader_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    first, second = LeaderLock(tmp_path / "l.lock"), LeaderLock(tmp_path / "l.lock")
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    assert second.held
    assert not first.held
    second.release()


async def test_cache_single_flight_errors_and_none_values() -> None:
    generation = 1
    cache = ServiceCache(60, lambda: f"s{generation}")
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise ConnectionError("backend down")

    results = await asyncio.gather(
        *(cache.get_or_load("k", failing) for _ in range(20)), return_exceptions=True
    )
    assert calls == 1  # one load for twenty concurrent misses
    assert all(isinstance(r, ConnectionError) for r in results)

    async def nothing() -> int | None:
        nonlocal calls
        calls += 1
        return None

    assert await cache.get_or_load("k", nothing) is None  # the error was not cached
    assert await cache.get_or_load("k", nothing) is None  # a cached None is a hit
    assert calls == 2
    generation = 2  # a new snapshot: the old entry is unreachable
    assert await cache.get_or_load("k", nothing) is None
    assert calls == 3
    # 20 concurrent misses, one retry after the error, one in the new generation.
    assert cache.identity() == {"hits": 1, "misses": 22, "loads": 2, "load_errors": 1}
    await cache.close()


def test_a_query_cancelled_while_the_database_opens_keeps_the_connection(
    tmp_path: Path,
) -> None:
    """A caller cancelled mid-open (a client gone; the refresh task stopped at shutdown)
    must not abort aiosqlite's connect: aborted, its thread later hands the result to a
    loop that may have closed, and dies with "Event loop is closed" (a CI run failed so)."""
    path = tmp_path / "service.db"
    private_database(path, create=True)
    assert not _sqlite_threads()
    started: set[threading.Thread] = set()
    failures: list[threading.ExceptHookArgs] = []

    async def scenario() -> None:
        nonlocal started
        database = SQLiteDatabase(path, busy_timeout=1.0)
        query = asyncio.ensure_future(database.fetchall("SELECT 1"))
        for _ in range(10_000):  # until aiosqlite's thread runs the connect
            if started := _sqlite_threads():
                break
            await asyncio.sleep(0.001)
        query.cancel()
        (outcome,) = await asyncio.gather(query, return_exceptions=True)
        assert isinstance(outcome, asyncio.CancelledError)
        for _ in range(200):
            if database.is_open:
                break
            await asyncio.sleep(0.01)
        assert database.is_open  # the open went on, for the next query
        assert [tuple(row) for row in await database.fetchall("SELECT 1")] == [(1,)]
        assert _sqlite_threads() == started  # the same one connection, no second thread
        await database.close()
        assert not database.is_open

    hook, threading.excepthook = threading.excepthook, failures.append
    try:
        asyncio.run(scenario())
        for thread in started:
            thread.join(5)
    finally:
        threading.excepthook = hook
    assert len(started) == 1
    assert not _sqlite_threads()
    assert not failures, failures[0].exc_value
