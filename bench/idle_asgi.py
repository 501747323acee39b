"""The idle stream as a raw ASGI app, no framework: what Hypercorn alone costs per
held stream, the floor under both Quart stacks of ``bench.idle_streams``.

``GET /idle`` sends one event, then a comment every ``QUART_SERVICE_STREAM_HEARTBEAT``
seconds; any other path answers ``{"pid": ...}`` (the probe).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

HEARTBEAT = float(os.environ.get("QUART_SERVICE_STREAM_HEARTBEAT", "15"))
_EVENT = b'data: {"token":"hello"}\n\n'
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """One ASGI callable; lifespan is acknowledged and nothing else is done."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] != "/idle":
        body = b'{"pid": %d}' % os.getpid()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    await send({"type": "http.response.body", "body": _EVENT, "more_body": True})
    while True:
        await asyncio.sleep(HEARTBEAT)
        await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
