"""Per-request observation: request ids, the access log line, request metrics.

An ASGI middleware around the whole app (WSGI mounts included), so it sees what the
client sees: the status actually sent, every body byte, and the end of a stream, not
the moment a view returned. The route label is the matched URL rule
(``/v1/models``, ``/model/<int:i>``), written into the ASGI scope by a
step run before each request's view, so metric series stay few whatever the paths
requested.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Request

from ..config import Settings
from ..errors import ErrorAnswer
from .access import AccessLog
from .metrics import Metrics
from .request_id import REQUEST_ID

__all__ = ["ROUTE_KEY", "UNMATCHED", "RequestObserver", "mark_route"]

ROUTE_KEY = "quart_service.route"
UNMATCHED = "<unmatched>"

# A client's id is kept when it is short and plain; anything else is replaced, so a
# header cannot forge log fields or blow up log lines.
_VALID_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")
_HEADER = b"x-request-id"
_CLOSE = (b"connection", b"close")


def mark_route(request: Request) -> None:
    """Request step: record the matched URL rule for the observer."""
    rule = request.url_rule
    if rule is not None:
        request.scope[ROUTE_KEY] = rule.rule  # type: ignore[literal-required]


class RequestObserver:
    """Wraps an ASGI app: ids, access log and metrics for each HTTP request."""

    def __init__(
        self, app: ASGIFramework, settings: Settings, draining: Callable[[], bool]
    ) -> None:
        self.app = app
        self.draining = draining
        json_lines = settings.log_format == "json"
        self.access_log = AccessLog(json_lines) if settings.access_log else None
        self.max_url = settings.max_url_length
        self.max_headers = settings.max_header_size
        self.in_progress = 0  # a plain int, copied to the gauge when sampled
        self.metrics: Metrics | None = None  # set when the worker starts serving

    def bind(self, metrics: Metrics) -> None:
        """Record requests into ``metrics`` from now on (at worker start-up)."""
        self.metrics = metrics
        metrics.on_sample(self._sample)

    def _sample(self, metrics: Metrics) -> None:
        metrics.in_progress.set(self.in_progress)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope["headers"]) or os.urandom(16).hex()
        token = REQUEST_ID.set(request_id)
        exchange = _Exchange(send, (_HEADER, request_id.encode()), self.draining)
        metrics = self.metrics  # None until the worker has started
        # No shared-file write per request: the gauge is sampled.
        self.in_progress += 1
        try:
            refusal = self._over_limit(scope)
            if refusal is None:
                await self.app(scope, receive, exchange)  # the exchange is the send
            else:
                await ErrorAnswer(scope["path"], *refusal).send(exchange)
        finally:
            elapsed = time.perf_counter() - exchange.started
            route = str(scope.get(ROUTE_KEY, UNMATCHED))
            # No response started: the client left first (or the app failed hard).
            final = exchange.status or 499
            self.in_progress -= 1
            if metrics is not None:
                # Time to first byte of responses sent in pieces (streams): for an
                # answer of known length it would only repeat the duration.
                first = exchange.first_byte if exchange.streamed else None
                metrics.observe_request(route, scope["method"], final, elapsed, first)
            if self.access_log is not None:
                client = scope.get("client")
                self.access_log.write(
                    scope["method"],
                    scope["path"],
                    route,
                    final,
                    elapsed,
                    exchange.sent,
                    request_id,
                    client[0] if client else "-",
                    _user_agent(scope["headers"]),
                )
            REQUEST_ID.reset(token)

    def _over_limit(self, scope: Any) -> tuple[int, str, str] | None:
        # Hypercorn's h11_max_incomplete_size only bounds a head that arrives in
        # pieces; a whole 60 KiB head in one packet passes
        # (https://github.com/python-hyper/h11/issues/182). So check here, cheaply.
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        if len(raw) + len(scope.get("query_string", b"")) > self.max_url:
            return 414, "url_too_long", f"The URL is over {self.max_url} bytes."
        size = 0
        for name, value in scope["headers"]:
            size += len(name) + len(value)
        if size > self.max_headers:
            return 431, "headers_too_large", f"The headers are over {self.max_headers} bytes."
        return None


class _Exchange:
    """What one response sent, seen through its ``send``.

    One small object per request, not a closure: a held stream keeps it for its whole
    life, and a closure over this state kept a cell per variable (about 0.4 KiB more
    per stream at 20,000 idle streams).
    """

    __slots__ = (
        "_draining",
        "_id_header",
        "first_byte",
        "sent",
        "server_send",
        "started",
        "status",
        "streamed",
    )

    def __init__(
        self,
        send: ASGISendCallable,
        id_header: tuple[bytes, bytes],
        draining: Callable[[], bool],
    ) -> None:
        # The server's own send. A stream, once its first chunk went through this
        # exchange, writes the rest with it and adds their bytes to ``sent`` itself:
        # no call of this exchange per token.
        self.server_send = send
        self._id_header = id_header
        self._draining = draining
        self.started = time.perf_counter()
        self.status = 0
        self.sent = 0
        self.streamed = False  # no Content-Length: the body goes out in pieces
        self.first_byte: float | None = None

    def __call__(self, message: Any) -> Awaitable[None]:
        """The response's send: a plain call that returns the server's own awaitable
        (no coroutine of ours per message: a stream sends one message per token)."""
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.sent += len(body)
                if self.first_byte is None:
                    self.first_byte = time.perf_counter() - self.started
        elif kind == "http.response.start":
            self.status = message["status"]
            headers = [*message.get("headers", ()), self._id_header]
            self.streamed = not any(name.lower() == b"content-length" for name, _ in headers)
            if self._draining():
                # Keep-alive clients leave this worker after this response.
                headers.append(_CLOSE)
            message["headers"] = headers
        return self.server_send(message)


def _user_agent(headers: Any) -> str:
    for name, value in headers:
        if name == b"user-agent":
            return str(value.decode("latin-1"))
    return ""


def _incoming_id(headers: Any) -> str | None:
    for name, value in headers:
        if name == _HEADER:
            return value.decode() if _VALID_ID.match(value) else None
    return None
