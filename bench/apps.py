"""The apps the benchmarks compare, each with the same three routes.

* ``GET /hello``  — a small JSON answer;
* ``GET /sse``    — an SSE stream of 100 small events from an async generator;
* ``GET /paced``  — the same with an ``await asyncio.sleep(0)`` between events (one per
  loop turn, as a model yields tokens);
* ``GET /paced-bytes`` — ``/paced`` yielding ready-made SSE bytes (what the service's
  stream costs without the JSON of each event; bare Quart's ``/paced`` already does);
* ``GET /paced-json`` — ``/paced`` with each event's JSON encoded as it is sent: the
  service's ``/paced`` again, and in bare Quart the hand-written line a token stream
  needs (``json.dumps`` into an f-string), where bare ``/paced`` sends one constant;
* ``GET /awaited`` — the same, each event awaited on a future that another callback
  completes a loop turn later (tokens handed over by a model's own task or thread);
* ``GET /sync``   — the same 100 events from a *sync* generator (bridged to a thread);
* ``GET /idle``   — one event, then a stream held open with heartbeats only.

``service`` is quart_service (``create_app`` + its ``sse()`` helper); ``bare`` is a
plain Quart app written the way its docs show. Both are built from the environment
and open nothing at import, like the real app.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from quart import Blueprint, Quart, Response

from quart_service import create_app, sse

EVENTS = 100
HEARTBEAT = float(os.environ.get("QUART_SERVICE_STREAM_HEARTBEAT", "15"))
_EVENT = b'data: {"token":"hello"}\n\n'
_ITEM = {"token": "hello"}


async def _handed_over() -> None:
    """Wait for a token the way a model's consumer does: on a future another callback
    completes (a queue fed by the model's task, a thread's result)."""
    loop = asyncio.get_running_loop()
    token = loop.create_future()
    loop.call_soon(token.set_result, None)
    await token


def _service_routes() -> Blueprint:
    bp = Blueprint("bench", __name__)

    @bp.get("/hello")
    async def hello() -> dict[str, Any]:
        return {"message": "hello", "pid": os.getpid()}

    @bp.get("/sse")
    async def stream() -> Response:
        async def produce() -> AsyncIterator[dict[str, str]]:
            for _ in range(EVENTS):
                yield _ITEM

        return sse(produce())

    @bp.get("/paced")
    @bp.get("/paced-json")
    async def paced() -> Response:
        # As a model yields: one token per loop turn, an await between them.
        async def produce() -> AsyncIterator[dict[str, str]]:
            for _ in range(EVENTS):
                yield _ITEM
                await asyncio.sleep(0)

        return sse(produce())

    @bp.get("/paced-bytes")
    async def paced_bytes() -> Response:
        async def produce() -> AsyncIterator[bytes]:
            for _ in range(EVENTS):
                yield _EVENT
                await asyncio.sleep(0)

        return sse(produce())

    @bp.get("/awaited")
    async def awaited() -> Response:
        async def produce() -> AsyncIterator[dict[str, str]]:
            for _ in range(EVENTS):
                await _handed_over()
                yield _ITEM

        return sse(produce())

    @bp.get("/sync")
    async def sync_stream() -> Response:
        def produce() -> Iterator[dict[str, str]]:
            for _ in range(EVENTS):
                yield _ITEM

        return sse(produce())

    @bp.get("/idle")
    async def idle() -> Response:
        # One event, then nothing: the service's heartbeats keep the stream alive.
        async def produce() -> AsyncIterator[dict[str, str]]:
            yield _ITEM
            await asyncio.Event().wait()

        return sse(produce())

    return bp


def _bare() -> Quart:
    # The routes in a blueprint, as the service's are (Quart looks up each request's
    # blueprints for its hooks and handlers: the same routing work in both apps).
    app = Quart("bare")
    bp = Blueprint("bench", __name__)

    @bp.get("/hello")
    async def hello() -> dict[str, Any]:
        return {"message": "hello", "pid": os.getpid()}

    @bp.get("/sse")
    async def stream() -> Response:
        async def produce() -> AsyncIterator[bytes]:
            for _ in range(EVENTS):
                yield _EVENT

        response = Response(produce(), content_type="text/event-stream")
        response.timeout = None
        return response

    @bp.get("/paced")
    @bp.get("/paced-bytes")
    async def paced() -> Response:
        async def produce() -> AsyncIterator[bytes]:
            for _ in range(EVENTS):
                yield _EVENT
                await asyncio.sleep(0)

        response = Response(produce(), content_type="text/event-stream")
        response.timeout = None
        return response

    @bp.get("/paced-json")
    async def paced_json() -> Response:
        # How a hand-written token stream writes each event: its JSON, every time.
        async def produce() -> AsyncIterator[bytes]:
            for _ in range(EVENTS):
                yield f"data: {json.dumps(_ITEM)}\n\n".encode()
                await asyncio.sleep(0)

        response = Response(produce(), content_type="text/event-stream")
        response.timeout = None
        return response

    @bp.get("/awaited")
    async def awaited() -> Response:
        async def produce() -> AsyncIterator[bytes]:
            for _ in range(EVENTS):
                await _handed_over()
                yield _EVENT

        response = Response(produce(), content_type="text/event-stream")
        response.timeout = None
        return response

    @bp.get("/sync")
    async def sync_stream() -> Response:
        def produce() -> Iterator[bytes]:
            for _ in range(EVENTS):
                yield _EVENT

        # Quart bridges a sync iterable with run_sync_iterable: one thread hop per item.
        response = Response(produce(), content_type="text/event-stream")
        response.timeout = None
        return response

    @bp.get("/idle")
    async def idle() -> Response:
        # The same held stream written by hand: an event, then a comment per interval.
        async def produce() -> AsyncIterator[bytes]:
            yield _EVENT
            while True:
                await asyncio.sleep(HEARTBEAT)
                yield b": keep-alive\n\n"

        response = Response(produce(), content_type="text/event-stream")
        response.timeout = None
        return response

    app.register_blueprint(bp)
    return app


service = create_app(blueprints=[_service_routes()])
bare = _bare()
