"""Mount an existing Flask (or any WSGI) app under a URL prefix, on the shared pool.

Hypercorn's ``AsyncioWSGIMiddleware`` runs the WSGI app with
``loop.run_in_executor(None, ...)``: the worker's one bounded pool. What it lacks is
added here:

* the body limit is a setting (its default is 64 KiB, hypercorn
  ``middleware/wsgi.py``; docs/design.md, pitfall 7), and a body over it answers 413
  naming the limit, whether the client sent a ``Content-Length`` (refused before the
  body is read) or streamed the body in chunks (Hypercorn would answer an empty 400);
* a full pool answers 503 with ``Retry-After``;
* the mounted app runs in the request's context, so what it logs carries the request
  id; a Flask app's log records (the traceback of a failed view above all) go to the
  service's log instead of Flask's own handler on standard output, and what any WSGI
  app writes to ``wsgi.errors`` goes there too (Hypercorn points it at stdout);
* the mounted app's own errors stay inside it (Flask answers 500 for that request).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from hypercorn.middleware import AsyncioWSGIMiddleware
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from ..errors import ErrorAnswer, Overloaded
from ..observability.observer import ROUTE_KEY

__all__ = ["WSGI_LOGGER", "WSGIMounts"]

WSGI_LOGGER = logging.getLogger("quart_service.wsgi")


class WSGIMounts:
    """An ASGI app: requests under a mounted prefix go to its WSGI app, others to ``app``."""

    def __init__(self, app: ASGIFramework, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.mounts: list[tuple[str, AsyncioWSGIMiddleware]] = []

    def mount(self, prefix: str, wsgi_app: Any) -> None:
        """Serve ``wsgi_app`` under ``prefix`` (``/legacy``: ``/legacy/...``)."""
        prefix = "/" + prefix.strip("/")
        _log_to_service(wsgi_app, prefix)
        # Hypercorn's own limit stays above ours: ours answers first, with a 413.
        middleware = _InContext(_ErrorsToLog(wsgi_app, prefix), self.max_body_size + 1)
        self.mounts.append((prefix, middleware))
        self.mounts.sort(key=lambda mount: -len(mount[0]))  # longest prefix wins

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            for prefix, middleware in self.mounts:
                if path == prefix or path.startswith(prefix + "/"):
                    await self._call_mounted(prefix, middleware, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _call_mounted(
        self,
        prefix: str,
        middleware: AsyncioWSGIMiddleware,
        scope: Any,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        length = _content_length(scope)
        if length is not None and length > self.max_body_size:
            await self._too_large(scope, send)
            return
        scope[ROUTE_KEY] = prefix + "/*"  # one metric series per mounted app
        # The body, read here up to the limit (Hypercorn's wrapper reads it whole
        # anyway): a streamed body over the limit gets the same 413.
        messages: list[Any] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_body_size:
                await self._too_large(scope, send)
                return
            if not message.get("more_body", False):
                break
        messages.reverse()

        async def replay() -> Any:
            return messages.pop() if messages else await receive()

        mounted = cast(Scope, {**scope, "root_path": scope.get("root_path", "") + prefix})
        try:
            await middleware(mounted, cast(ASGIReceiveCallable, replay), send)
        except Overloaded as exc:
            # Refused before the WSGI app ran: nothing was sent yet.
            await ErrorAnswer.of(scope["path"], exc).send(send)

    async def _too_large(self, scope: Any, send: ASGISendCallable) -> None:
        message = f"The request body is over the limit of {self.max_body_size} bytes."
        await ErrorAnswer(scope["path"], 413, "request_too_large", message).send(send)


class _InContext(AsyncioWSGIMiddleware):
    """Hypercorn's middleware, with the WSGI app run in a copy of the request's
    context (``run_in_executor`` alone does not carry it): its log records then carry
    the request id."""

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()

        def spawn(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
            return loop.run_in_executor(None, context.run, fn, *args)

        def call_soon(fn: Callable[..., Any], *args: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(fn(*args), loop).result()

        await self.wsgi_app(scope, receive, send, spawn, call_soon)


class _ErrorsToLog:
    """The WSGI app, with ``wsgi.errors`` written to the service's log, and the body
    marked complete: Hypercorn has read all of it, so a chunked upload (no
    ``Content-Length``) reaches the app instead of reading as empty (werkzeug reads
    such a body only when ``wsgi.input_terminated`` says it ends)."""

    def __init__(self, app: Any, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.errors"] = _ErrorStream(self.prefix)
        environ["wsgi.input_terminated"] = True
        result: Iterable[bytes] = self.app(environ, start_response)
        return result


class _ErrorStream:
    """A ``wsgi.errors`` stream: each line becomes an ERROR record of the service."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._pending = ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                WSGI_LOGGER.error("mounted app %s: %s", self.prefix, line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._pending.strip():
            WSGI_LOGGER.error("mounted app %s: %s", self.prefix, self._pending)
        self._pending = ""


class _ToServiceLog(logging.Handler):
    """Hands a Flask app's records to the service's ``quart_service.wsgi`` logger, so
    they are written by the service's handler, in its format, with the request id."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        if not WSGI_LOGGER.isEnabledFor(record.levelno):
            return
        record.msg = f"mounted app {self.prefix}: {record.getMessage()}"
        record.args = None
        record.name = WSGI_LOGGER.name
        WSGI_LOGGER.handle(record)


def _log_to_service(wsgi_app: Any, prefix: str) -> None:
    """A Flask app writes its records with its own handler to standard output (in a
    request, ``wsgi.errors``); send them to the service's log instead."""
    flask = sys.modules.get("flask")  # a Flask app was imported with its package
    if flask is None or not isinstance(wsgi_app, flask.Flask):
        return
    from flask.logging import default_handler

    logger: logging.Logger = wsgi_app.logger

    logger.removeHandler(default_handler)
    logger.addHandler(_ToServiceLog(prefix))
    # Through the service's logger alone: not a second time through the root's.
    logger.propagate = False


def _content_length(scope: Any) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
