"""FastAPI with sse-starlette's ``EventSourceResponse``: the common LLM serving stack.

The same ``GET /tokens?n=N&rate=R`` as :mod:`bench.stream_apps`, written the way
sse-starlette's README shows it (the generator yields the JSON of each chunk; the
response frames it). Needs the ``bench`` extra (fastapi, sse-starlette, uvicorn).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sse_starlette import EventSourceResponse

from bench.stream_apps import DEFAULT_RATE, DEFAULT_TOKENS, TOKEN

app = FastAPI()


@app.get("/tokens")
async def tokens(n: int = DEFAULT_TOKENS, rate: float = DEFAULT_RATE) -> EventSourceResponse:
    """``n`` token chunks, one every ``1/rate`` seconds."""
    pause = 1 / rate

    async def produce() -> AsyncIterator[str]:
        for index in range(n):
            if index:
                await asyncio.sleep(pause)
            yield json.dumps(TOKEN)

    return EventSourceResponse(produce())
