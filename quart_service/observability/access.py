"""The access log line, written cheaply when the service's own handler is in place.

Through ``logging``, one line cost about 40 µs of a worker's CPU inside a request (a
``LogRecord``, the caller lookup, the formatter, the handler chain), more than a
tenth of Hypercorn's whole per-request work. When the service's own stderr handler is
the one that would write the line (the default: no logging configured elsewhere), the
line is formatted here, in the same text or JSON layout, and written to that
handler's stream under its lock. When an operator configured logging, or a test
captures it, the line goes through ``logging`` as any other record.

The line names the client: its address (the peer of the connection; behind a proxy,
the proxy's) and its ``User-Agent``, cut to 200 characters.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from typing import Any

from .logs import service_handler

__all__ = ["ACCESS_LOGGER", "AccessLog"]

ACCESS_LOGGER = logging.getLogger("quart_service.access")

_MAX_AGENT = 200  # characters of User-Agent kept: a header cannot blow up log lines


class AccessLog:
    """One line per request on the ``quart_service.access`` logger."""

    def __init__(self, json_format: bool) -> None:
        self.json_format = json_format
        self._second = self._iso_second = -1
        self._stamp = self._iso_head = self._iso_offset = ""

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
        handler = service_handler(ACCESS_LOGGER)
        if handler is None:
            fields = self._fields(method, path, route, status, ms, sent, client, agent)
            ACCESS_LOGGER.info("%s", message, extra=fields if self.json_format else None)
            return
        if self.json_format:
            line = json.dumps(
                {
                    "time": self._iso_time(),
                    "process": os.getpid(),
                    "level": "INFO",
                    "logger": ACCESS_LOGGER.name,
                    "message": message,
                    "request_id": request_id,
                    **self._fields(method, path, route, status, ms, sent, client, agent),
                }
            )
        else:
            line = f"[{self._text_time()}] [{os.getpid()}] [INFO] {ACCESS_LOGGER.name}: {message}"
        with handler.lock or _NO_LOCK:
            handler.stream.write(line + "\n")
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


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
