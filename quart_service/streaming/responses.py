"""``sse()`` and ``ndjson()``: streaming responses from async generators or sync iterators.

::

    @app.get("/tokens")
    async def tokens() -> Response:
        async def generate() -> AsyncIterator[dict[str, str]]:
            async for token in model.stream(prompt):
                yield {"token": token}
        return sse(generate())

A sync iterator (a plain generator from blocking code) runs on the shared pool. The
response is exempt from Quart's ``RESPONSE_TIMEOUT``, which would silently cut a long
stream (``handle_request`` in quart/asgi.py wraps the whole response in ``wait_for``;
docs/design.md, pitfall 1); the stream's own idle and total limits apply instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping
from contextvars import copy_context
from typing import Any

from quart import Response

from ..part import current_part
from .body import StreamBody, StreamHub
from .events import NDJSON, SSE, Encoder

__all__ = ["ndjson", "sse", "stream_response"]

_STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}


def sse(
    source: AsyncIterable[Any] | Iterable[Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A ``text/event-stream`` response; see :mod:`quart_service.streaming.events`."""
    return stream_response(source, SSE, status=status, headers=headers)


def ndjson(
    source: AsyncIterable[Any] | Iterable[Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An ``application/x-ndjson`` response: one JSON document per line."""
    return stream_response(source, NDJSON, status=status, headers=headers)


def stream_response(
    source: AsyncIterable[Any] | Iterable[Any],
    encoder: Encoder,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A streaming response in the wire format of ``encoder``."""
    if isinstance(source, str | bytes | Mapping) or not isinstance(
        source, AsyncIterable | Iterable
    ):
        raise TypeError(
            f"a stream needs an async generator or an iterator of events, "
            f"not {type(source).__name__}"
        )
    hub: StreamHub = current_part(StreamHub.name)
    executor = hub.executor
    if not isinstance(source, AsyncIterable):
        # Refuse now, while a 503 can still be sent, rather than mid-stream.
        executor.check_capacity()
    # The producer runs in another task or thread: give it this request's context.
    body = StreamBody(source, encoder, hub, executor, copy_context())
    response = Response(body, status=status, content_type=encoder.media_type)
    response.headers.update(_STREAM_HEADERS)
    if headers:
        response.headers.update(headers)
    response.timeout = None  # Quart: no deadline for the whole response
    return response
