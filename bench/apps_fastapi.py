"""FastAPI with sse-starlette, the common LLM serving stack, with bench.apps' routes.

``GET /hello`` (JSON) and ``GET /paced`` (100 SSE events, an ``await asyncio.sleep(0)``
between them, written the way sse-starlette's README shows: the generator yields the
JSON of each chunk and the response frames it). Needs the ``bench`` extra.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from sse_starlette import EventSourceResponse

from bench.apps import EVENTS

app = FastAPI()
_ITEM = {"token": "hello"}


@app.get("/hello")
async def hello() -> dict[str, Any]:
    """The same small JSON answer as the other apps."""
    return {"message": "hello", "pid": os.getpid()}


@app.get("/paced")
async def paced() -> EventSourceResponse:
    """One event per loop turn, as a model yields tokens."""

    async def produce() -> AsyncIterator[str]:
        for _ in range(EVENTS):
            yield json.dumps(_ITEM, separators=(",", ":"))
            await asyncio.sleep(0)

    return EventSourceResponse(produce())
