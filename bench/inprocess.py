"""Per-request and per-event cost of the apps' ASGI callables alone, with no server.

    python -m bench.inprocess [/paced /awaited /sse /hello]

Each app (``bench.apps:service`` and ``bench.apps:bare``) is started in this process
and its ASGI callable is driven directly with a send that does nothing, so the number
is what the framework and the service add, without Hypercorn's share. Process CPU
time, the minimum of 7 interleaved rounds of 100 requests (this machine is shared).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from typing import Any

import uvloop
from quart import Quart

os.environ.setdefault("QUART_SERVICE_DATA_DIR", tempfile.mkdtemp(prefix="bench-inprocess-"))

from bench._asgi import http_scope
from bench.apps import EVENTS, bare, service


async def _one(app: Quart, path: str) -> None:
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        return None

    await app(http_scope(path), receive, send)  # type: ignore[arg-type]


async def _seconds_per_request(app: Quart, path: str, requests: int) -> float:
    started = time.process_time()
    for _ in range(requests):
        await _one(app, path)
    return (time.process_time() - started) / requests


async def _main(paths: list[str]) -> None:
    async with service.test_app(), bare.test_app():
        for path in paths:
            for app in (service, bare):
                await _seconds_per_request(app, path, 20)  # warm up
            ours, theirs = [], []
            for _ in range(7):
                ours.append(await _seconds_per_request(service, path, 100))
                theirs.append(await _seconds_per_request(bare, path, 100))
            per = 1 if path == "/hello" else EVENTS
            unit = "request" if per == 1 else "event"
            s, b = min(ours) / per * 1e6, min(theirs) / per * 1e6
            print(
                f"{path:9} service {s:7.2f} us  bare {b:7.2f} us per {unit}  "
                f"ratio {s / b:4.2f}  (+{s - b:.2f} us)",
                flush=True,
            )


if __name__ == "__main__":
    uvloop.run(_main(sys.argv[1:] or ["/paced", "/awaited", "/sse", "/hello"]))
