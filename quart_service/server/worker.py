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
from typing import Any

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import load_application

from ..config import Settings
from ..drain import on_server_stop
from ..errors import SettingsError
from ..native_threads import cap_native_threads

__all__ = ["READY", "STOPPING", "run_worker"]

READY = b"ready"
STOPPING = b"stopping"

# After it stops accepting, a worker waits this long before Hypercorn's shutdown, so
# that connections it accepted just before read their first request (a few loop turns).
_ACCEPTED_GRACE = 0.2


def run_worker(config: Config, sockets: Sockets, ready: Connection) -> None:
    """Serve ``config.application_path`` on ``sockets`` until told to stop (SIGTERM)."""
    # Ctrl-C reaches the whole process group; the supervisor alone decides. SIGHUP is
    # the supervisor's (rolling restart), never a worker's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _cap_native_threads(config.workers)
    app = load_application(config.application_path, config.wsgi_max_body_size)
    servers: list[asyncio.AbstractServer] = []

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
            # Hypercorn's shutdown closes every connection that has not sent a
            # request yet, at once, also one accepted a moment ago whose request is
            # waiting unread: its client gets no response. So stop accepting first
            # and let those connections read their request before Hypercorn's turn.
            for server in servers:
                server.close()
            await asyncio.sleep(_ACCEPTED_GRACE)
        finally:
            # Also when Hypercorn cancels this (max_requests): the server closes its
            # sockets next, and the supervisor starts this worker's replacement.
            with contextlib.suppress(OSError):
                ready.send_bytes(STOPPING)
            ready.close()

    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if config.worker_class == "uvloop":
        import uvloop

        new_loop = uvloop.new_event_loop

    def loop_factory() -> asyncio.AbstractEventLoop:
        return _remembering_servers(new_loop(), servers)

    with asyncio.Runner(debug=config.debug, loop_factory=loop_factory) as runner:
        runner.run(
            worker_serve(app, config, sockets=sockets, shutdown_trigger=serving_until_drained)
        )


def _cap_native_threads(workers: int) -> None:
    """The native thread caps, before the app module is imported: then even a model
    library the app module imports at its top loads capped (under the hypercorn
    command, create_app() is the earliest place, after the app module's own imports).

    Done here in the worker rather than in the supervisor's environment: the setting
    is read afresh by each worker (a SIGHUP reload applies a changed one), and the
    operator's own caps stay told apart from ours."""
    try:
        setting = Settings.from_env().native_threads
    except SettingsError:
        return  # the app's create_app() names the bad setting and exits 2
    cap_native_threads(setting, workers=workers)


def _remembering_servers(
    loop: asyncio.AbstractEventLoop, servers: list[asyncio.AbstractServer]
) -> asyncio.AbstractEventLoop:
    """``loop``, whose ``create_server`` (``asyncio.start_server`` calls it) adds each
    server to ``servers``: Hypercorn keeps its servers to itself until it shuts down."""
    create_server = loop.create_server

    async def remembered(*args: Any, **kwargs: Any) -> asyncio.Server:
        server = await create_server(*args, **kwargs)
        servers.append(server)
        return server

    loop.create_server = remembered  # type: ignore[method-assign]
    return loop
