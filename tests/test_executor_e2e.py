"""The one bounded pool per worker, under a real Hypercorn: thread bound and shedding."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from .support.server import peak_threads, running_server

POOL = 8
DATABASE_CONNECTIONS = 1  # the refresh leader's aiosqlite connection runs one thread


async def _mixed_load(url: str, total: int) -> list[int]:
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(i: int) -> int:
            kind = i % 3
            if kind == 0:
                response = await client.get(f"{url}/block", params={"ms": 20})
            elif kind == 1:
                response = await client.get(f"{url}/model/{i}", params={"ms": 20})
            else:
                response = await client.get(
                    f"{url}/sync-stream", params={"count": 20, "delay": 0.002}
                )
                assert response.text.count("data: ") == 20
            return response.status_code

        return await asyncio.gather(*(one(i) for i in range(total)))


@pytest.mark.slow
def test_threads_per_worker_stay_within_the_pool_bound(tmp_path: Path) -> None:
    env = {
        "QUART_SERVICE_EXECUTOR_THREADS": str(POOL),
        "QUART_SERVICE_EXECUTOR_QUEUE": "1000",
    }
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        peak_threads(server.worker_pids()) as peak,
    ):
        for _ in range(2):  # two rounds of 200 concurrent requests
            statuses = asyncio.run(_mixed_load(server.url, 200))
            assert statuses == [200] * 200
    bound = POOL + DATABASE_CONNECTIONS + 2
    print("peak threads per worker:", peak)
    assert all(0 < n <= bound for n in peak.values()), peak
    # The load did use the pool (10 resources, sync views, bridged streams).
    assert max(peak.values()) >= POOL, peak


async def _flood(url: str, count: int) -> list[tuple[int, float, httpx.Response]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started = time.monotonic()

        async def one() -> tuple[int, float, httpx.Response]:
            response = await client.get(url)
            return response.status_code, time.monotonic() - started, response

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.slow
def test_full_pool_and_queue_shed_with_503_then_recover(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_EXECUTOR_THREADS": "2", "QUART_SERVICE_EXECUTOR_QUEUE": "2"}
    with running_server(tmp_path, workers=2, env=env) as server:
        results = asyncio.run(_flood(server.url + "/block?ms=1500", 40))
        ok = [r for r in results if r[0] == 200]
        shed = [r for r in results if r[0] == 503]
        assert len(ok) + len(shed) == 40
        # Each worker admits pool + queue = 4 jobs; everything beyond is shed.
        assert 4 <= len(ok) <= 8
        for _, elapsed, response in shed:
            assert elapsed < 1.0  # refused at once, not after waiting for a thread
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"

        # A bridged stream is refused before its headers while the pool is full.
        async def stream_while_full() -> int:
            async with httpx.AsyncClient(timeout=30) as client:
                blockers = [
                    asyncio.ensure_future(client.get(server.url + "/block?ms=1000"))
                    for _ in range(40)
                ]
                await asyncio.sleep(0.3)
                response = await client.get(server.url + "/sync-stream?count=3")
                await asyncio.gather(*blockers)
                return response.status_code

        assert asyncio.run(stream_while_full()) == 503
        # Load gone: the service answers normally again.
        for _ in range(10):
            response = httpx.get(server.url + "/block?ms=5", timeout=10)
            assert response.status_code == 200
            assert response.json()["thread"].startswith("quart-service-pool")
