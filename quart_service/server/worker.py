"""The body of one ``quart-service serve`` worker process (spawned).

It is Hypercorn's own worker (``worker_serve``: the same protocol, timeouts and
lifespan handling as the ``hypercorn`` command) with two additions the supervisor
needs: the worker says on a pipe when it is serving (``READY``) and when it stops
accepting (``STOPPING``: drained, or Hypercorn's ``max_requests`` reached), and its
drain can make the server stop accepting (see :mod:`quart_service.drain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import load_application

from ..drain import on_server_stop

__all__ = ["READY", "STOPPING", "run_worker"]

READY = b"ready"
STOPPING = b"stopping"


def run_worker(config: Config, sockets: Sockets, ready: Connection) -> None:
    """Serve ``config.application_path`` on ``sockets`` until told to stop (SIGTERM)."""
    # Ctrl-C reaches the whole process group; the supervisor alone decides. SIGHUP is
    # the supervisor's (rolling restart), never a worker's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = load_application(config.application_path, config.wsgi_max_body_size)

    async def serving_until_drained() -> None:
        # Hypercorn awaits this once its sockets accept connections.
        stop = asyncio.Event()
        on_server_stop(stop.set)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # An app without the service's drain still shuts down gracefully.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.send_bytes(READY)
        try:
            await stop.wait()
        finally:
            # Also when Hypercorn cancels this (max_requests): the server closes its
            # sockets next, and the supervisor starts this worker's replacement.
            with contextlib.suppress(OSError):
                ready.send_bytes(STOPPING)
            ready.close()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if config.worker_class == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(debug=config.debug, loop_factory=loop_factory) as runner:
        runner.run(
            worker_serve(app, config, sockets=sockets, shutdown_trigger=serving_until_drained)
        )
