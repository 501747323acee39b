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

Under servers whose worker handles SIGTERM itself (Granian, Uvicorn, Hypercorn with
``workers = 0``), the drain runs beside the server's own graceful shutdown instead of
replacing it: the server's handler still runs, so the server stops accepting and
lets open responses finish, and the drain ends the open streams at the deadline;
then the server closes the connections and runs the shutdown hook. A handler that
belongs to the event loop (Granian's, Hypercorn's) runs at once; a plain one
(Uvicorn's) runs after the first second, as the "stop accepting" step above. The
server's own timeout (Granian's ``--workers-kill-timeout``, Uvicorn's
``--timeout-graceful-shutdown``) must exceed the drain, or it cuts the streams
first (docs/servers.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from types import FrameType

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
        # The server's own SIGTERM handler, deferred to the "stop accepting" step.
        self._server_stops: list[Callable[[], object]] = []
        self._server_told = False
        self._previous: Callable[[int, FrameType | None], object] | None = None

    async def start(self, metrics: Metrics) -> None:
        """Handle SIGTERM in this worker: alone where nobody else does (Hypercorn's
        spawned workers, ``quart-service serve``), chained before the server's own
        handler where the server has one (Granian, Uvicorn)."""
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_DFL:
            loop.add_signal_handler(signal.SIGTERM, self.begin)
        elif callable(previous):
            self._previous = previous
            signal.signal(signal.SIGTERM, self._chained(loop, previous))

    async def stop(self) -> None:
        """Give SIGTERM back to the server's handler, if it had one (the loop closes)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    async def readiness(self) -> Readiness:
        """Not ready while draining: load balancers stop sending here."""
        if self.draining:
            return Readiness(problems=["draining: the worker is shutting down"])
        return Readiness()

    def identity(self) -> dict[str, bool]:
        """Whether this worker is draining."""
        return {"draining": self.draining}

    def _chained(
        self, loop: asyncio.AbstractEventLoop, previous: Callable[[int, FrameType | None], object]
    ) -> Callable[[int, FrameType | None], None]:
        """A SIGTERM handler that starts the drain, then hands the signal on."""
        # uvloop's dispatcher is a bound method of the loop; asyncio's is a no-op from
        # asyncio.unix_events (the loop reads the signal from its wake-up fd). Either
        # way, the handlers registered on the loop run as soon as this returns.
        belongs_to_loop = getattr(previous, "__self__", None) is loop or getattr(
            previous, "__module__", ""
        ).startswith("asyncio")

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self._server_told = True
            if belongs_to_loop:
                previous(signum, frame)
            else:
                self._server_stops.append(functools.partial(previous, signum, frame))
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to drain
                loop.call_soon_threadsafe(self.begin)

        return on_sigterm

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
        for stop in (*_server_stops, *self._server_stops):
            stop()
        while self.streams.open and loop.time() < deadline:
            await asyncio.sleep(_POLL)
        ended = self.streams.shut_down()
        if ended:
            _log.info("worker %d: drain deadline, ended %d streams", os.getpid(), ended)
        if self._server_told:
            # The server's own graceful shutdown closes the connections and runs the
            # shutdown hook; its timeout bounds what is still open.
            return
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
