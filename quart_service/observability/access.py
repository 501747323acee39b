"""The access log line, written cheaply when the service's own handler is in place.

Through ``logging``, one line cost about 40 µs of a worker's CPU inside a request (a
``LogRecord``, the caller lookup, the formatter, the handler chain), more than a
tenth of Hypercorn's whole per-request work. When the service's own stderr handler is
the one that would write the line (the default: no logging configured elsewhere), the
line is formatted here, in the same text or JSON layout, and queued on that handler:
the lines of a busy worker go out together at most :data:`FLUSH_AFTER` seconds
later, in one write (a worker killed with ``SIGKILL`` loses at most that much of its access
log; any other exit writes it). When an operator configured logging, or a test
captures it, the line goes through ``logging`` as any other record.

The line names the client: its address (the peer of the connection; behind a proxy,
the proxy's) and its ``User-Agent``, cut to 200 characters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import datetime
from typing import Any

from .logs import ServiceHandler, service_handler

__all__ = ["ACCESS_LOGGER", "FLUSH_AFTER", "AccessLog"]

ACCESS_LOGGER = logging.getLogger("quart_service.access")

_MAX_AGENT = 200  # characters of User-Agent kept: a header cannot blow up log lines

FLUSH_AFTER = 0.1
"""Seconds a queued access line may wait for the batch it is written in."""


class AccessLog:
    """One line per request on the ``quart_service.access`` logger."""

    def __init__(self, json_format: bool) -> None:
        self.json_format = json_format
        self._second = self._iso_second = -1
        self._stamp = self._iso_head = self._iso_offset = ""
        self._pid = os.getpid()
        # The handler lines are queued on until the next flush; None: none queued.
        self._queue: ServiceHandler | None = None

    def write(
        self,
        method: str,
        path: str,
        route: str,
        status: int,
        elapsed: float,
        sent: int,
        request_id: str,
        client: str = "-",
        user_agent: str = "",
    ) -> None:
        """Write the line for one answered request (if INFO is enabled)."""
        if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
            return
        ms = elapsed * 1000
        agent = user_agent[:_MAX_AGENT]
        quoted = agent
        if '"' in agent or "\\" in agent:  # rare: most agents need no escaping
            quoted = agent.replace("\\", "\\\\").replace('"', '\\"')
        message = (
            f"{method} {path} {status} {ms:.1f}ms {sent}B id={request_id} "
            f'client={client} ua="{quoted}"'
        )
        handler = self._queue or self._handler()
        if handler is None:
            fields = self._fields(method, path, route, status, ms, sent, client, agent)
            ACCESS_LOGGER.info("%s", message, extra=fields if self.json_format else None)
            return
        if self.json_format:
            line = json.dumps(
                {
                    "time": self._iso_time(),
                    "process": self._pid,
                    "level": "INFO",
                    "logger": ACCESS_LOGGER.name,
                    "message": message,
                    "request_id": request_id,
                    **self._fields(method, path, route, status, ms, sent, client, agent),
                }
            )
        else:
            line = f"[{self._text_time()}] [{self._pid}] [INFO] {ACCESS_LOGGER.name}: {message}"
        handler.defer(line + "\n")
        if self._queue is None:
            self._flush_soon(handler)

    def _handler(self) -> ServiceHandler | None:
        # Looked up when no line is queued: the handler found is kept until the flush,
        # so a logging configuration changed meanwhile applies from the next batch.
        handler = service_handler(ACCESS_LOGGER)
        if handler is not None and os.getpid() != self._pid:
            self._pid = os.getpid()  # a forked child writes its own pid
        return handler

    def _flush_soon(self, handler: ServiceHandler) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside a request's loop (a script, a test): at once
            handler.flush()
            return
        self._queue = handler
        loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        """Write the queued lines now (the clock does it; so does a stopping worker)."""
        handler, self._queue = self._queue, None
        if handler is not None:
            handler.flush()

    def _text_time(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now))
        return self._stamp

    def _iso_time(self) -> str:
        # As logs.iso_time, with the part up to the second formatted once a second.
        now = time.time()
        second = int(now)
        if second != self._iso_second:
            self._iso_second = second
            stamp = datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
            self._iso_head, self._iso_offset = stamp[:19], stamp[19:]
        return f"{self._iso_head}.{int((now - second) * 1000):03d}{self._iso_offset}"

    @staticmethod
    def _fields(
        method: str,
        path: str,
        route: str,
        status: int,
        ms: float,
        sent: int,
        client: str,
        agent: str,
    ) -> dict[str, Any]:
        return {
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "duration_ms": round(ms, 3),
            "bytes": sent,
            "client": client,
            "user_agent": agent,
        }
