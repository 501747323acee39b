"""The service's Quart class: its own per-request steps run as plain calls.

Quart runs each ``before_request`` function through ``ensure_async`` (an inspection
of the function) and the function then reads the request through its context proxy:
about 2.5 µs a hook on every request, more than the step itself. The service adds
two steps to every request (the route label for the metrics, the gate of skipped
team plugins), so they run here instead, as plain calls given the request, before
the app's and the blueprints' own hooks (as hooks registered first would).

It also keeps less per request, which an open stream keeps for its whole life: its
own HTTP connection and request body (``http_connection.py``, ``request_body.py``),
one null session for all requests, and ``asgi_app`` as a plain call (docs/design.md,
"What an open stream keeps").
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Quart, Request
from quart.ctx import RequestContext
from quart.globals import request_ctx
from quart.sessions import NullSession, SecureCookieSessionInterface
from quart.typing import ResponseReturnValue

from .http_connection import ServiceHTTPConnection
from .request_body import ServiceRequest

__all__ = ["RequestStep", "ServiceQuart", "SharedNullSessions"]

RequestStep = Callable[[Request], None]
"""A step run on every request before its view: it may raise to answer instead."""


class SharedNullSessions(SecureCookieSessionInterface):
    """Quart's signed-cookie sessions, with one null session for every request while
    there is no secret key, not a new one each: a null session refuses every write,
    and a new one (a dict, its attributes' dict and a closure) was half a kilobyte per
    request, kept as long as an open stream keeps its request context."""

    _null: NullSession | None = None

    async def make_null_session(self, app: Quart) -> NullSession:
        """The one null session (made on first use)."""
        if self._null is None:
            self._null = self.null_session_class()
        return self._null


class ServiceQuart(Quart):
    """Quart, plus :attr:`request_steps` run before every request's own hooks, and
    one task per request (:class:`~.http_connection.ServiceHTTPConnection`)."""

    asgi_http_class = ServiceHTTPConnection
    request_class = ServiceRequest
    session_interface = SharedNullSessions()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.request_steps: list[RequestStep] = []

    def asgi_app(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Coroutine[Any, Any, None]:
        """Quart's, as a plain call that returns the handler's coroutine for an HTTP
        request: one coroutine less between the server and every open stream."""
        if scope["type"] == "http":
            return self.asgi_http_class(self, scope)(receive, send)
        return super().asgi_app(scope, receive, send)

    async def preprocess_request(
        self, request_context: RequestContext | None = None
    ) -> ResponseReturnValue | None:
        """Run the service's steps, then Quart's own (url value preprocessors and
        ``before_request`` hooks)."""
        if self.request_steps:
            request = (request_context or request_ctx).request
            for step in self.request_steps:
                step(request)
        return await super().preprocess_request(request_context)
