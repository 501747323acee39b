"""The apps ``bench.streams`` compares: paced token streams, as a language model yields.

Each app serves ``GET /tokens?n=N&rate=R``: an SSE stream of ``N`` small events (an
OpenAI-like token chunk, ``{"t":"tok"}``, JSON-encoded per event), the first at once
and then one every ``1/R`` seconds (``await asyncio.sleep(1 / R)`` between tokens).

* ``service`` — quart_service: ``create_app`` with a blueprint whose view returns
  ``sse()`` of an async generator (the way bench/apps.py builds it);
* ``bare``    — a plain Quart app with a hand-written SSE async generator;
* ``fastapi`` — FastAPI with sse-starlette's ``EventSourceResponse``, in its own module
  (:mod:`bench.stream_apps_fastapi`), so the Quart apps do not need FastAPI installed.

Every app is built from the environment and opens nothing at import.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from quart import Blueprint, Quart, Response, request

from quart_service import create_app, sse

TOKEN = {"t": "tok"}
DEFAULT_TOKENS = 100
DEFAULT_RATE = 20.0


def _arguments() -> tuple[int, float]:
    """``n`` and ``rate`` from the query string of the current request."""
    count = request.args.get("n", DEFAULT_TOKENS, type=int)
    rate = request.args.get("rate", DEFAULT_RATE, type=float)
    return count, rate


def _service_routes() -> Blueprint:
    bp = Blueprint("stream_bench", __name__)

    @bp.get("/tokens")
    async def tokens() -> Response:
        count, rate = _arguments()
        pause = 1 / rate

        async def produce() -> AsyncIterator[dict[str, str]]:
            for index in range(count):
                if index:
                    await asyncio.sleep(pause)
                yield TOKEN  # the service encodes it as JSON

        return sse(produce())

    return bp


def _bare() -> Quart:
    app = Quart("bare_streams")

    @app.get("/tokens")
    async def tokens() -> Response:
        count, rate = _arguments()
        pause = 1 / rate

        async def produce() -> AsyncIterator[bytes]:
            for index in range(count):
                if index:
                    await asyncio.sleep(pause)
                yield b"data: " + json.dumps(TOKEN).encode() + b"\n\n"

        response = Response(produce(), content_type="text/event-stream")
        response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut a long stream
        return response

    return app


service = create_app(blueprints=[_service_routes()])
bare = _bare()
