"""Mount an existing Flask (or any WSGI) app under a URL prefix, on the shared pool.

Hypercorn's ``AsyncioWSGIMiddleware`` runs the WSGI app with
``loop.run_in_executor(None, ...)``: the worker's one bounded pool. What it lacks is
added here: the body limit is a setting (its default is 64 KiB, hypercorn
``middleware/wsgi.py``; docs/design.md, pitfall 7) and a body over it answers 413
before it is read; a full pool answers 503 with
``Retry-After``; the mounted app's own errors stay inside it (Flask answers 500 for
that request alone).
"""

from __future__ import annotations

from typing import Any, cast

from hypercorn.middleware import AsyncioWSGIMiddleware
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from ..errors import ErrorAnswer, Overloaded
from ..observability.observer import ROUTE_KEY

__all__ = ["WSGIMounts"]


class WSGIMounts:
    """An ASGI app: requests under a mounted prefix go to its WSGI app, others to ``app``."""

    def __init__(self, app: ASGIFramework, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.mounts: list[tuple[str, AsyncioWSGIMiddleware]] = []

    def mount(self, prefix: str, wsgi_app: Any) -> None:
        """Serve ``wsgi_app`` under ``prefix`` (``/legacy``: ``/legacy/...``)."""
        prefix = "/" + prefix.strip("/")
        self.mounts.append((prefix, AsyncioWSGIMiddleware(wsgi_app, self.max_body_size)))
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
            message = f"The request body is over the limit of {self.max_body_size} bytes."
            await ErrorAnswer(scope["path"], 413, "request_too_large", message).send(send)
            return
        scope[ROUTE_KEY] = prefix + "/*"  # one metric series per mounted app
        mounted = cast(Scope, {**scope, "root_path": scope.get("root_path", "") + prefix})
        try:
            await middleware(mounted, receive, send)
        except Overloaded as exc:
            # Refused before the WSGI app ran: nothing was sent yet.
            await ErrorAnswer.of(scope["path"], exc).send(send)


def _content_length(scope: Any) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
