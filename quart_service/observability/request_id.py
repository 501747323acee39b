"""The id of the request being handled, for log lines and team code."""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["REQUEST_ID", "current_request_id"]

REQUEST_ID: ContextVar[str] = ContextVar("quart_service_request_id", default="")


def current_request_id() -> str:
    """The id of the request being handled ("" outside a request)."""
    return REQUEST_ID.get()
