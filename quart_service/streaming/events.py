"""Wire formats of the streams: Server-Sent Events and NDJSON.

An encoder turns what a producer yields into bytes, and writes the stream's control
frames (heartbeat, error, end). Producers may yield:

* :class:`ServerSentEvent` — full control of ``event``, ``id`` and ``retry``;
* ``str`` — sent as the data as it is;
* ``bytes`` — sent as already-encoded wire bytes (no framing added);
* anything else — encoded as compact JSON (orjson: a stream encodes every token, and
  the standard library's encoder cost ~1.8 µs of the ~20 µs a token costs a worker).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

__all__ = ["NDJSON", "SSE", "Encoder", "ServerSentEvent", "error_payload"]

_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_OPTIONS: Final = orjson.OPT_NON_STR_KEYS
_orjson = orjson.dumps  # a global, not a module attribute looked up per token


def _dumps(item: Any) -> bytes:
    """Compact UTF-8 JSON, as ``json.dumps(separators=(",", ":"), ensure_ascii=False)``."""
    try:
        return orjson.dumps(item, option=_OPTIONS)
    except TypeError:
        # What orjson refuses and the standard library takes (an int beyond 64 bits,
        # a dict key of another type); anything else raises the same TypeError again.
        return _json(item).encode()


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One SSE event. ``data`` that is not a ``str`` is sent as JSON."""

    data: Any
    event: str | None = None
    id: str | None = None
    retry: int | None = None  # milliseconds the client waits before reconnecting


class Encoder(Protocol):
    """How one wire format writes items and control frames."""

    @property
    def media_type(self) -> str:
        """The Content-Type of the stream."""
        ...

    @property
    def heartbeat(self) -> bytes | None:
        """The keep-alive frame; None where the format has none."""
        ...

    def encode(self, item: Any) -> bytes:
        """The bytes of one produced item."""
        ...

    def error(self, code: str, message: str, retry: int | None = None) -> bytes:
        """A final frame telling the client why the stream ended early; ``retry``
        (milliseconds) tells it to reconnect after that long."""
        ...


def error_payload(code: str, message: str) -> dict[str, Any]:
    """The JSON of an error frame, the same shape as the service's error bodies."""
    return {"error": {"code": code, "message": message}}


class _SSE:
    media_type: Final[str] = "text/event-stream"
    heartbeat: Final[bytes | None] = b": keep-alive\n\n"

    def encode(self, item: Any) -> bytes:
        if type(item) is dict:  # a token's JSON: the common case, first and inline
            try:
                # No option: a keyword argument costs orjson a fifth of the call.
                # What it refuses so (a key that is not a str) _dumps() takes.
                return b"data: " + _orjson(item) + b"\n\n"
            except TypeError:
                return b"data: " + _dumps(item) + b"\n\n"
        if isinstance(item, str):
            return _data_lines(item) + b"\n"
        if isinstance(item, bytes):
            return item
        if isinstance(item, ServerSentEvent):
            return _sse_event(item)
        return b"data: " + _dumps(item) + b"\n\n"

    def error(self, code: str, message: str, retry: int | None = None) -> bytes:
        payload = error_payload(code, message)
        return _sse_event(ServerSentEvent(payload, event="error", retry=retry))


class _NDJSON:
    media_type: Final[str] = "application/x-ndjson"
    heartbeat: Final[bytes | None] = None

    def encode(self, item: Any) -> bytes:
        if isinstance(item, bytes):
            return item
        if isinstance(item, str):
            return item.encode() + b"\n"
        return _dumps(item) + b"\n"

    def error(self, code: str, message: str, retry: int | None = None) -> bytes:
        payload = error_payload(code, message)
        if retry is not None:
            payload["error"]["retry_after_ms"] = retry
        return _dumps(payload) + b"\n"


def _data_lines(text: str) -> bytes:
    # A data field may not contain a newline: each line gets its own "data:" field,
    # and the client joins them with "\n" again (HTML Living Standard, 9.2.6).
    if "\n" not in text and "\r" not in text:
        return b"data: " + text.encode() + b"\n"
    return b"".join(b"data: " + line.encode() + b"\n" for line in text.splitlines())


def _sse_event(event: ServerSentEvent) -> bytes:
    parts: list[bytes] = []
    if event.event is not None:
        parts.append(b"event: " + _field(event.event) + b"\n")
    if event.id is not None:
        parts.append(b"id: " + _field(event.id) + b"\n")
    if event.retry is not None:
        parts.append(b"retry: " + str(int(event.retry)).encode() + b"\n")
    data = event.data if isinstance(event.data, str) else _dumps(event.data).decode()
    parts.append(_data_lines(data))
    parts.append(b"\n")
    return b"".join(parts)


def _field(value: str) -> bytes:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE event or id field cannot contain a newline: {value!r}")
    return value.encode()


SSE: Final[Encoder] = _SSE()
NDJSON: Final[Encoder] = _NDJSON()
