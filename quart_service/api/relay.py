"""Relaying a request to a :class:`~quart_service.engines.base.Proxy` engine's upstream:
its answer unchanged, its status and error body included; a stream that fails midway
ends with an OpenAI error event and ``[DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from quart import Response, request

from ..context import engines
from ..engines.base import Proxy, ProxyReply
from ..errors import ErrorAnswer, ServiceError
from ..streaming import sse
from .generation import closing

__all__ = ["error_event", "relay"]

_log = logging.getLogger("quart_service.api")


async def relay(engine: Proxy, endpoint: str, body: dict[str, Any]) -> Response:
    """``body`` sent to the upstream's ``endpoint``; its answer, whole or streamed."""
    counts = engines().counts
    counts.requests.inc()
    reply = await engine.relay(endpoint, body)
    if reply.lines is None:
        return _relayed(reply)
    counts.streams.inc()
    return sse(_relayed_events(reply.lines), headers=reply.headers)


def _relayed(reply: ProxyReply) -> Response:
    """The upstream's whole answer: its status and body (an error that is not in
    OpenAI's shape is put in it)."""
    headers = {**reply.headers, "Content-Type": "application/json"}
    if reply.status == 200:
        return Response(reply.body, status=200, headers=headers)
    _log.warning("upstream answered %d: %s", reply.status, reply.body[:300])
    try:
        parsed = json.loads(reply.body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        return Response(reply.body, status=reply.status, headers=headers)
    detail = reply.body[:500].decode(errors="replace")
    answer = ErrorAnswer(
        request.path, reply.status, "upstream_error", f"The upstream answered: {detail}"
    ).response()
    answer.headers.update(reply.headers)
    return answer


async def _relayed_events(lines: AsyncIterator[str]) -> AsyncIterator[Any]:
    """The upstream's SSE lines as they come; a failure mid-stream ends the stream with
    an OpenAI error event and ``[DONE]``."""
    counts = engines().counts
    boundary = True  # between two events
    try:
        async with closing(lines) as relayed:
            async for line in relayed:
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    counts.tokens.inc()
                boundary = line == ""
                yield (line + "\n").encode()
    except ServiceError as exc:
        _log.warning("a relayed stream failed: %s", exc.message)
        if not boundary:
            yield b"\n"
        yield error_event(exc)
        yield "[DONE]"


def error_event(exc: ServiceError) -> dict[str, Any]:
    """An error in OpenAI's shape, as a stream event."""
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}}
