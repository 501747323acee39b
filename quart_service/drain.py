"""A worker's graceful drain on SIGTERM: finish what is open, end streams cleanly.

Sequence (``drain_timeout`` is the ``stream_drain_timeout`` setting)::

    t0            SIGTERM: /readyz turns 503, every response says Connection: close,
                  so keep-alive clients move to other workers without a failed request
    t0 + 1 s      the server stops accepting (when it lets us: under
                  ``quart-service serve``) and closes idle connections
    ...           open streams and in-flight requests go on
    t0 + drain    every stream still open gets a final event (SSE ``retry:`` and an
                  ``error`` event with code ``shutdown``) and ends; the client reconnects
    then          the server closes the connections and runs the shutdown hook; the
                  process exits 0

Why a worker handles SIGTERM itself: Hypercorn's parent, on SIGTERM, waits for the
*first* worker to exit and then kills the others at once with their streams
(Hypercorn 0.18, ``run.py``). Under plain ``hypercorn`` the worker has no way to make
the server stop accepting, so after the drain it closes its resources and exits 0 on
its own if nobody stopped it (Hypercorn replaces a worker that exits 0; any other
code stops the whole server).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from .observability.metrics import Metrics
from .part import Readiness
from .streaming.body import StreamHub

__all__ = ["Drain", "on_server_stop"]

_log = logging.getLogger("quart_service")

# Keep-alive clients get this long to see "Connection: close" before idle
# connections are closed under them (closing an idle connection races the client's
# next request on it).
_SOFT = 1.0
# After the streams ended, how long the server's own shutdown may take to begin
# before the worker decides that nobody else is stopping it.
_HANDOVER = 2.0
_POLL = 0.05
_server_stops: list[Callable[[], None]] = []


def on_server_stop(stop: Callable[[], None]) -> None:
    """Register how to make this process's server stop accepting connections (the
    ``quart-service serve`` worker does; plain Hypercorn offers no such hook)."""
    _server_stops.append(stop)


class Drain:
    """This worker's drain, as a part of it: started by SIGTERM (or :meth:`begin`), once;
    while it runs, ``/readyz`` says so."""

    name = "drain"

    def __init__(
        self,
        drain_timeout: float,
        streams: StreamHub,
        stopping: Callable[[], bool],
        shutdown: Callable[[], Awaitable[None]],
    ) -> None:
        self.drain_timeout = drain_timeout
        self.streams = streams
        self.draining = False
        self._stopping = stopping
        self._shutdown = shutdown
        self._task: asyncio.Task[None] | None = None

    async def start(self, metrics: Metrics) -> None:
        """Handle SIGTERM in this worker unless the server already does
        (single-process Hypercorn installs its own; spawned workers have none)."""
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.begin)

    async def stop(self) -> None:
        """Nothing to release: the drain ends with the process."""

    async def readiness(self) -> Readiness:
        """Not ready while draining: load balancers stop sending here."""
        if self.draining:
            return Readiness(problems=["draining: the worker is shutting down"])
        return Readiness()

    def identity(self) -> dict[str, bool]:
        """Whether this worker is draining."""
        return {"draining": self.draining}

    def begin(self) -> None:
        """Start draining (idempotent)."""
        if self._task is not None:
            return
        self.draining = True
        _log.info(
            "worker %d: SIGTERM, draining %d open streams for up to %g s",
            os.getpid(),
            len(self.streams.open),
            self.drain_timeout,
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        await asyncio.sleep(min(_SOFT, self.drain_timeout))
        for stop in _server_stops:
            stop()
        while self.streams.open and loop.time() < deadline:
            await asyncio.sleep(_POLL)
        ended = self.streams.shut_down()
        if ended:
            _log.info("worker %d: drain deadline, ended %d streams", os.getpid(), ended)
        handover = loop.time() + _HANDOVER
        while not self._stopping() and loop.time() < handover:
            await asyncio.sleep(_POLL)
        if self._stopping():
            return  # the server is shutting this worker down properly
        _log.warning("worker %d: drained; nobody stopped the server, exiting", os.getpid())
        # Close what it holds (the database connection's thread would keep the
        # process alive), then exit 0. SystemExit leaves the event loop from this task.
        await self._shutdown()
        raise SystemExit(0)
