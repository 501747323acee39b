"""The bounded pool in process: admission, accounting, the loop's default executor."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from quart.typing import TestAppProtocol as RunningApp

from quart_service import BoundedExecutor, Overloaded


def test_admits_threads_plus_queue_then_refuses() -> None:
    executor = BoundedExecutor(2, 3, retry_after=2)
    release = threading.Event()
    try:
        futures = [executor.submit(release.wait, 5) for _ in range(5)]
        time.sleep(0.1)
        stats = executor.stats()
        assert (stats.active, stats.queued, stats.threads) == (2, 3, 2)
        with pytest.raises(Overloaded) as refused:
            executor.submit(release.wait, 5)
        assert refused.value.retry_after == 2
        assert not executor.has_capacity()
        # Already-admitted work (the next step of a stream) is never refused.
        futures.append(executor.submit_admitted(release.wait, 5))
        release.set()
        assert all(f.result(timeout=5) for f in futures)
        time.sleep(0.05)
        stats = executor.stats()
        assert (stats.active, stats.queued, stats.rejected) == (0, 0, 1)
        assert executor.has_capacity()
    finally:
        release.set()
        executor.shutdown(wait=True)


def test_a_cancelled_job_gives_its_place_back() -> None:
    executor = BoundedExecutor(1, 1)
    release = threading.Event()
    try:
        running = executor.submit(release.wait, 5)
        queued = executor.submit(release.wait, 5)
        assert not executor.has_capacity()
        assert queued.cancel()
        assert executor.has_capacity()
        release.set()
        assert running.result(timeout=5)
    finally:
        release.set()
        executor.shutdown(wait=True)


async def test_the_pool_is_the_loops_default_executor(test_app: RunningApp) -> None:
    name = await asyncio.get_running_loop().run_in_executor(
        None, lambda: threading.current_thread().name
    )
    assert name.startswith("quart-service-pool")
