"""A steady, bounded load of JSON requests and SSE streams, with failures attributed.

Each client keeps one keep-alive connection, as real clients do, and remembers which
worker (pid) answered on it last: a failure is charged to that worker, so a test can
tell "a request on the worker that was killed failed" from "a request elsewhere
failed".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx


@dataclass
class Failure:
    """One failed request: what, when, on which worker (None: not known)."""

    kind: str
    pid: int | None
    at: float
    error: str


@dataclass
class LoadReport:
    """What the load saw while it ran."""

    ok_json: int = 0
    ok_streams: int = 0
    failures: list[Failure] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    shutdown_events: int = 0

    def failed_on(self, pids: set[int | None]) -> list[Failure]:
        return [f for f in self.failures if f.pid in pids]

    def failed_elsewhere(self, pids: set[int | None]) -> list[Failure]:
        return [f for f in self.failures if f.pid not in pids]


async def _json_client(url: str, report: LoadReport, stop: asyncio.Event) -> None:
    limits = httpx.Limits(max_connections=1, keepalive_expiry=600)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        pid: int | None = None
        while not stop.is_set():
            try:
                response = await client.get("/livez")
                response.raise_for_status()
                pid = response.json()["pid"]
                report.ok_json += 1
                report.pids.add(pid)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                report.failures.append(Failure("json", pid, time.monotonic(), repr(exc)))
                pid = None  # the next request goes out on a new connection
            await asyncio.sleep(0.005)


async def _stream_client(
    url: str, report: LoadReport, stop: asyncio.Event, events: int, interval: float
) -> None:
    limits = httpx.Limits(max_connections=1, keepalive_expiry=600)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        pid: int | None = None
        while not stop.is_set():
            received = 0
            try:
                path = f"/demo/stream?count={events}&interval={interval}"
                async with client.stream("GET", path) as response:
                    response.raise_for_status()
                    event = ""
                    async for line in response.aiter_lines():
                        if line.startswith("event: error"):
                            event = "error"
                        elif line.startswith("data: "):
                            data = json.loads(line[6:])
                            if event == "error":
                                report.shutdown_events += 1
                                raise RuntimeError(f"stream ended early: {data}")
                            pid = data["pid"]
                            report.pids.add(pid)
                            received += 1
                if received != events:
                    raise RuntimeError(f"stream cut after {received} of {events} events")
                report.ok_streams += 1
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                report.failures.append(Failure("stream", pid, time.monotonic(), repr(exc)))
                pid = None


@contextlib.asynccontextmanager
async def steady_load(
    url: str,
    *,
    json_clients: int = 6,
    stream_clients: int = 4,
    stream_events: int = 10,
    stream_interval: float = 0.05,
) -> AsyncIterator[LoadReport]:
    """Run the load while the block runs; the report is complete after the block."""
    report = LoadReport()
    stop = asyncio.Event()
    tasks = [
        *(asyncio.create_task(_json_client(url, report, stop)) for _ in range(json_clients)),
        *(
            asyncio.create_task(_stream_client(url, report, stop, stream_events, stream_interval))
            for _ in range(stream_clients)
        ),
    ]
    try:
        yield report
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
