"""The service's log lines on stderr: text in Hypercorn's format, or JSON.

Every record carries the id of the request it was written in (``request_id``), so
the lines of one request can be found together; JSON lines have it as a field.
JSON lines carry their time in ISO 8601 with milliseconds and the UTC offset
(``2026-11-26T03:04:05.678+00:00``), which log stores parse without a pattern;
text lines keep Hypercorn's layout, so both servers' lines read alike.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from .request_id import current_request_id

__all__ = [
    "RequestIdFilter",
    "ServiceHandler",
    "configure_logging",
    "iso_time",
    "service_handler",
]

_TEXT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
_JSON = "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s %(request_id)s"
_DATE = "%Y-%m-%d %H:%M:%S %z"
_MARK = "_quart_service_handler"


def iso_time(created: float) -> str:
    """``created`` (seconds since the epoch) in ISO 8601, local time with its offset,
    to the millisecond: ``2026-11-26T03:04:05.678+00:00``."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class _IsoTimeJson(JsonFormatter):
    """python-json-logger's formatter with ISO 8601 times (``datefmt`` has no
    milliseconds: ``time.strftime`` knows none)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)


class ServiceHandler(logging.StreamHandler[TextIO]):
    """The service's stderr handler: log records, and ready-made lines (the access
    log) that it writes in batches.

    A line written and flushed on its own costs a system call per request; queued
    with :meth:`defer`, the lines of a busy worker go out in one write per flush
    (as nginx's ``access_log ... buffer= flush=``). Whoever defers a line arranges
    the flush. Queued lines are written before any record the handler emits, so
    the order of lines is kept, and at :meth:`flush` (also at interpreter exit,
    through ``logging.shutdown``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[str] = []

    def defer(self, line: str) -> None:
        """Queue ``line`` (ending in a newline) for the next write."""
        self._pending.append(line)

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:  # called under the handler's lock (Handler.handle)
            self._write_pending()
        super().emit(record)

    def flush(self) -> None:
        """Write the queued lines, then flush the stream."""
        with self.lock or _NO_LOCK:
            self._write_pending()
            super().flush()

    def _write_pending(self) -> None:
        if self._pending and self.stream is not None:
            lines, self._pending = self._pending, []
            self.stream.write("".join(lines))


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (empty outside requests) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


def configure_logging(level: str, fmt: str = "text") -> None:
    """Give the ``quart_service`` logger a stderr handler unless one is configured
    elsewhere (an operator's logging config wins)."""
    logger = logging.getLogger("quart_service")
    logger.setLevel(level.upper())
    ours = [h for h in logger.handlers if getattr(h, _MARK, False)]
    if (logger.handlers and not ours) or (not ours and logging.getLogger().handlers):
        return
    handler = ours[0] if ours else ServiceHandler()
    if fmt == "json":
        handler.setFormatter(
            _IsoTimeJson(
                _JSON,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT, _DATE))
    if not ours:
        setattr(handler, _MARK, True)
        handler.addFilter(RequestIdFilter())
        logger.addHandler(handler)


def service_handler(logger: logging.Logger) -> ServiceHandler | None:
    """The service's own stderr handler when it alone would write ``logger``'s
    records (nothing else configured, nobody capturing); else None."""
    parent = logging.getLogger("quart_service")
    if logger.handlers or not logger.propagate or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if not isinstance(handler, ServiceHandler) or not getattr(handler, _MARK, False):
        return None
    if (parent.propagate and logging.getLogger().handlers) or handler.filters[1:]:
        return None  # something else also receives the records (a capture, a config)
    return handler
