"""An example stream, so a fresh install shows streaming with curl.

``GET /demo/stream?count=10&interval=0.5&format=sse`` sends ``count`` events, one
every ``interval`` seconds, as SSE (default) or NDJSON (``format=ndjson``). With
``source=sync`` the events come from a plain blocking generator run on the pool.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from quart import Blueprint, Response, request

from ..errors import InvalidParameter
from ..streaming import ndjson, sse

__all__ = ["demo"]

demo = Blueprint("demo", __name__)

_MAX_COUNT = 100_000
_MAX_INTERVAL = 60.0


def _number(name: str, default: float, low: float, high: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParameter(f"query parameter {name!r} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise InvalidParameter(f"query parameter {name!r} must be in [{low:g}, {high:g}]")
    return value


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = request.args.get(name, default)
    if value not in allowed:
        raise InvalidParameter(f"query parameter {name!r} must be one of {', '.join(allowed)}")
    return value


@demo.get("/demo/stream")
async def stream() -> Response:
    """Count upwards, one event per interval."""
    count = int(_number("count", 10, 0, _MAX_COUNT))
    interval = _number("interval", 0.5, 0, _MAX_INTERVAL)
    fmt = _choice("format", "sse", ("sse", "ndjson"))
    source = _choice("source", "async", ("async", "sync"))
    pid = os.getpid()

    async def produce() -> AsyncIterator[dict[str, Any]]:
        for n in range(count):
            yield {"n": n, "of": count, "pid": pid}
            if interval:
                await asyncio.sleep(interval)

    def produce_blocking() -> Iterator[dict[str, Any]]:
        for n in range(count):
            yield {"n": n, "of": count, "pid": pid}
            if interval:
                time.sleep(interval)

    events = produce() if source == "async" else produce_blocking()
    return sse(events) if fmt == "sse" else ndjson(events)
