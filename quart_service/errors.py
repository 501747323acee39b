"""The service's exceptions, and the one place that turns any error into an HTTP answer.

The tree (a test checks it against every subclass in the package)::

    ServiceError                  base: every error this package raises on purpose
     ├── SettingsError            a setting is unknown or has a bad value (start-up)
     ├── PluginError              a team blueprint cannot be loaded or mounted (start-up)
     ├── MigrationError           a migration file is malformed or failed (start-up)
     ├── InvalidParameter         400: a request parameter is missing or malformed
     ├── Unauthorized             401: no or a wrong bearer token
     ├── NotFound                 404: the named thing does not exist
     │    └── ModelNotFound       404: no such model, or it is disabled
     ├── Conflict                 409: the named thing exists already
     ├── EngineError              502: an engine cannot be built or failed generating
     ├── Overloaded               503: the pool, its queue or a resource's limit is full
     ├── ResourceUnavailable      503: a resource could not be created
     ├── PluginUnavailable        503: a team plugin's migrations failed; it is skipped
     ├── DatasetUnavailable       503: a dataset has never loaded in this worker
     ├── DatabaseBusy             503: another writer holds the database's lock
     └── DatabaseUnavailable      503: the database file cannot be opened

Every answer has one of two JSON shapes, chosen by the request's path:

* the service's, everywhere but ``/v1``::

      {"error": {"code": "overloaded", "message": "...", "status": 503}}

* OpenAI's, for everything under ``/v1`` (404, 405, 413, 414, 431 and 503 included),
  so the official clients raise their usual exceptions::

      {"error": {"message": "...", "type": "server_error", "param": null,
                 "code": "overloaded"}}

``code`` is stable (clients may branch on it); ``message`` says what to do. A 503
carries ``Retry-After`` in whole seconds, rounded up (:func:`retry_after_header`).
Unexpected exceptions answer 500 ``internal_error`` and never leak a traceback.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

__all__ = [
    "OPENAI_PREFIX",
    "Conflict",
    "DatabaseBusy",
    "DatabaseUnavailable",
    "DatasetUnavailable",
    "EngineError",
    "ErrorAnswer",
    "InvalidParameter",
    "MigrationError",
    "ModelNotFound",
    "NotFound",
    "Overloaded",
    "PluginError",
    "PluginUnavailable",
    "ResourceUnavailable",
    "ServiceError",
    "SettingsError",
    "Unauthorized",
    "install_error_handlers",
    "retry_after_header",
]

_log = logging.getLogger("quart_service.errors")

OPENAI_PREFIX = "/v1"


class ServiceError(Exception):
    """Base class of the errors this package raises; carries an HTTP status and a code.

    ``code`` may be given per instance (a finer code than the class's), ``param`` names
    the request field at fault, ``retry_after`` (seconds) becomes ``Retry-After``."""

    status: ClassVar[int] = 500
    code: str = "internal_error"
    # Worth a warning in the log when it reaches a client (the operator may act).
    logged: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.param = param
        if code is not None:
            self.code = code


class SettingsError(ServiceError):
    """A setting is unknown or its value cannot be used; the message names the key."""

    code = "bad_settings"


class PluginError(ServiceError):
    """A team blueprint cannot be loaded or mounted; the message names it."""

    code = "plugin_error"


class MigrationError(ServiceError):
    """A migration file is malformed or failed to apply; the message names it."""

    code = "migration_failed"


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


class ModelNotFound(NotFound):
    """No model of that name, or it is disabled."""

    code = "model_not_found"


class Conflict(ServiceError):
    """The named thing exists already."""

    status = 409
    code = "conflict"


class EngineError(ServiceError):
    """An engine cannot be built or failed while generating."""

    status = 502
    code = "engine_error"
    logged = True


class Overloaded(ServiceError):
    """The work cannot be queued now; the client should retry after ``retry_after``."""

    status = 503
    code = "overloaded"


class ResourceUnavailable(ServiceError):
    """A resource this request needs failed to initialise; it is retried on the next use."""

    status = 503
    code = "resource_unavailable"


class PluginUnavailable(ServiceError):
    """The plugin serving this route was skipped at start-up (its migrations failed)."""

    status = 503
    code = "plugin_unavailable"


class DatasetUnavailable(ServiceError):
    """A dataset this request reads has no loaded version yet (its loader fails)."""

    status = 503
    code = "dataset_unavailable"


class DatabaseBusy(ServiceError):
    """Another writer held the database's lock past the busy timeout; retry shortly."""

    status = 503
    code = "database_busy"
    logged = True


class DatabaseUnavailable(ServiceError):
    """The database file cannot be opened (moved, deleted, unreadable); retry later."""

    status = 503
    code = "database_unavailable"
    logged = True


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` takes whole seconds: round up, so a client never retries early."""
    return str(max(1, math.ceil(seconds)))


class ErrorAnswer:
    """One error as the client receives it: status, headers and JSON body."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        path: str,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        if _is_openai(path):
            kind = "server_error" if status >= 500 else "invalid_request_error"
            error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
        else:
            error = {"code": code, "message": message, "status": status}
            if param is not None:
                error["param"] = param
        self.body = json.dumps({"error": error}, separators=(",", ":")).encode()
        self.headers: dict[str, str] = {"Content-Type": "application/json"}
        if retry_after is not None:
            self.headers["Retry-After"] = retry_after_header(retry_after)

    @classmethod
    def of(cls, path: str, exc: ServiceError) -> ErrorAnswer:
        """The answer to a :class:`ServiceError` raised while serving ``path``."""
        return cls(
            path, exc.status, exc.code, exc.message, param=exc.param, retry_after=exc.retry_after
        )

    def response(self) -> Response:
        """As a Quart response (inside the app)."""
        return Response(self.body, status=self.status, headers=self.headers)

    async def send(self, send: Callable[[Any], Awaitable[None]]) -> None:
        """On a raw ASGI ``send`` (middleware, outside Quart)."""
        headers = [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def _is_openai(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


# Werkzeug's own texts ("If you entered the URL manually...") speak to a browser user;
# these say what an API client should do.
def _http_message(exc: HTTPException, max_body: int | None) -> tuple[str, str]:
    status = exc.code or 500
    if status == 404:
        return "not_found", f"No route for {request.method} {request.path}; see /openapi.json."
    if status == 405:
        allowed = ", ".join(sorted(exc.valid_methods or ()))  # type: ignore[attr-defined]
        return "method_not_allowed", (
            f"{request.method} is not allowed on {request.path}; allowed: {allowed}."
        )
    if status == 413:
        limit = f" of {max_body} bytes" if max_body else ""
        return "request_too_large", f"The request body is over the limit{limit}."
    name = (exc.name or "error").lower()
    return "".join(ch if ch.isalnum() else "_" for ch in name), exc.description or exc.name


def install_error_handlers(app: Quart) -> None:
    """Answer every error raised while handling a request in the shape of its path."""

    @app.errorhandler(ServiceError)
    async def _service_error(exc: ServiceError) -> Response:
        if exc.logged:
            _log.warning("%s %s: %s: %s", request.method, request.path, exc.code, exc.message)
        return ErrorAnswer.of(request.path, exc).response()

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        code, message = _http_message(exc, app.config.get("MAX_CONTENT_LENGTH"))
        response = ErrorAnswer(request.path, exc.code or 500, code, message).response()
        for name, value in exc.get_headers():
            # Keep the Allow header that werkzeug computes for 405 answers.
            if name.lower() == "allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        # Log the traceback for the operator; the client gets a stable code only.
        _log.exception("unhandled error in a view")
        message = "The server failed; the error was logged."
        return ErrorAnswer(request.path, 500, "internal_error", message).response()
