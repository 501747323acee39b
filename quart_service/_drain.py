"""Let open streams finish when a worker is told to stop (SIGTERM).

Hypercorn's parent process, on SIGTERM, asks every worker to stop and waits for the
*first* one to exit; then it sends SIGTERM to the others, which kills them at once
with their streams (Hypercorn 0.18, ``run.py``: ``process.terminate()`` after the
first exit). So ``graceful_timeout`` only protected the streams of the worker that
happened to exit first. A worker of this service therefore handles SIGTERM itself:
it keeps serving its open streams for up to ``stream_drain_timeout``, and exits on
its own if the server does not shut it down in the meantime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger("quart_service")

# After the last stream ends, how long the server's own shutdown may take to begin
# before the worker decides that nobody else is stopping it.
_HANDOVER = 2.0
_POLL = 0.1


def install_sigterm_drain(
    drain_timeout: float,
    active_streams: Callable[[], int],
    stopping: Callable[[], bool],
    shutdown: Callable[[], Awaitable[None]],
) -> bool:
    """Handle SIGTERM in this worker unless the server already does (single-process
    Hypercorn installs its own handler; spawned workers have the default)."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def on_sigterm() -> None:
        if tasks:
            return
        log.info(
            "worker %d: SIGTERM, draining %d open streams for up to %g s",
            os.getpid(),
            active_streams(),
            drain_timeout,
        )
        tasks.add(loop.create_task(_drain(drain_timeout, active_streams, stopping, shutdown)))

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    return True


async def _drain(
    drain_timeout: float,
    active_streams: Callable[[], int],
    stopping: Callable[[], bool],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_timeout
    while active_streams() and loop.time() < deadline:
        await asyncio.sleep(_POLL)
    handover = loop.time() + _HANDOVER
    while not stopping() and loop.time() < handover:
        await asyncio.sleep(_POLL)
    if stopping():
        return  # the server is shutting this worker down properly
    left = active_streams()
    log.warning("worker %d: drain over with %d streams open; exiting", os.getpid(), left)
    # Nobody else is stopping this worker (the SIGTERM was for it alone): close what
    # it holds (the database connection's thread would keep the process alive), then
    # exit with code 0: Hypercorn replaces a worker that exits 0, but shuts the whole
    # server down for any other code. SystemExit leaves the event loop from this task.
    await shutdown()
    raise SystemExit(0)
