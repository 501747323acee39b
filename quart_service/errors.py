"""The service's exceptions, and the one place that turns them into HTTP answers.

The tree::

    ServiceError                 base: every error this package raises on purpose
     ├── SettingsError           a setting is unknown or has a bad value (start-up)
     ├── InvalidParameter        400: a request parameter is missing or malformed
     ├── Unauthorized            401: no or a wrong bearer token
     ├── NotFound                404: the named thing does not exist
     ├── Conflict                409: the named thing exists already
     ├── Overloaded              503: the thread pool, its queue or a resource's
     │                           concurrency limit is full; retry after a moment
     └── ResourceUnavailable     503: a resource could not be created

Every error answers with the same JSON body, whatever raised it::

    {"error": {"code": "overloaded", "message": "...", "status": 503}}

``code`` is stable (clients may branch on it); ``message`` says what to do.
Unexpected exceptions answer 500 ``internal_error`` and never leak a traceback.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from quart import Quart, Response
from werkzeug.exceptions import HTTPException

__all__ = [
    "Conflict",
    "InvalidParameter",
    "NotFound",
    "Overloaded",
    "ResourceUnavailable",
    "ServiceError",
    "SettingsError",
    "Unauthorized",
    "error_response",
    "register_error_handlers",
    "send_error",
]

log = logging.getLogger("quart_service.errors")


class ServiceError(Exception):
    """Base class of the errors this package raises; carries an HTTP status and a code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class SettingsError(ServiceError):
    """A setting is unknown or its value cannot be used; the message names the key."""

    code = "bad_settings"


class InvalidParameter(ServiceError):
    """A request parameter is missing or malformed; the message names it."""

    status = 400
    code = "invalid_parameter"


class Unauthorized(ServiceError):
    """No or a wrong credential; the message says what to send."""

    status = 401
    code = "unauthorized"


class NotFound(ServiceError):
    """The named thing does not exist."""

    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """The named thing exists already."""

    status = 409
    code = "conflict"


class Overloaded(ServiceError):
    """The work cannot be queued now; the client should retry after ``retry_after``."""

    status = 503
    code = "overloaded"


class ResourceUnavailable(ServiceError):
    """A resource this request needs failed to initialise; it is retried on the next use."""

    status = 503
    code = "resource_unavailable"


def error_response(
    status: int, code: str, message: str, *, retry_after: float | None = None
) -> Response:
    """Build the service's JSON error answer."""
    body = {"error": {"code": code, "message": message, "status": status}}
    response = Response(_json_dumps(body), status=status, content_type="application/json")
    if retry_after is not None:
        # Retry-After takes whole seconds; round up so a client never retries early.
        response.headers["Retry-After"] = str(max(1, int(-(-retry_after // 1))))
    return response


def _json_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _http_code(exc: HTTPException) -> str:
    name = (exc.name or "error").lower()
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def register_error_handlers(app: Quart) -> None:
    """Answer every error raised by a view with the service's JSON error body."""

    @app.errorhandler(ServiceError)
    async def _service_error(exc: ServiceError) -> Response:
        return error_response(exc.status, exc.code, exc.message, retry_after=exc.retry_after)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = error_response(status, _http_code(exc), exc.description or exc.name)
        for name, value in exc.get_headers():
            # Keep the Allow header that werkzeug computes for 405 answers.
            if name.lower() == "allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(sqlite3.OperationalError)
    async def _database_error(exc: sqlite3.OperationalError) -> Response:
        # Locked by another writer past the busy timeout, or the file is gone: the
        # request may succeed shortly, so 503 with Retry-After rather than a 500.
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            log.warning("database busy: %s", exc)
            return error_response(
                503,
                "database_busy",
                "The database is locked by another writer; retry.",
                retry_after=1.0,
            )
        if "unable to open" in text or "disk i/o" in text or "readonly" in text:
            log.warning("database unavailable: %s", exc)
            return error_response(
                503,
                "database_unavailable",
                "The database cannot be reached; retry.",
                retry_after=5.0,
            )
        log.exception("database error in a view")
        return error_response(500, "internal_error", "The server failed; the error was logged.")

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        # Log the traceback for the operator; the client gets a stable code only.
        log.exception("unhandled error in a view")
        return error_response(500, "internal_error", "The server failed; the error was logged.")


async def send_error(
    send: Callable[[Any], Awaitable[None]],
    status: int,
    code: str,
    message: str,
    retry_after: float | None = None,
) -> None:
    """The JSON error body, sent on a raw ASGI ``send`` (outside Quart: middleware)."""
    body = json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
