"""The data plane's parts in process: migrations, files, lock, cache."""

from __future__ import annotations

import asyncio
from pathlib import Path

from quart_service import ServiceCache
from quart_service.coordination import LeaderLock, PublishedFile


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
