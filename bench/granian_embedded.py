"""Serve an app with Granian's embedded server in this one process, on uvloop.

    python -m bench.granian_embedded MODULE:APP PORT

``bench.instructions --server granian`` runs this under valgrind: the Granian CLI
always starts its workers as child processes, and valgrind counts one process. The
embedded server builds the same Rust worker (``ASGIWorker.serve_async`` with one
runtime thread, ASGI with lifespan) as a CLI worker does, on the loop of the process
that calls it. SIGTERM stops it; an app that handles SIGTERM itself (the service
drains) stops the loop on its own.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys

import uvloop
from granian.constants import Interfaces
from granian.server.embed import Server


async def _serve(target: str, port: int) -> None:
    module, _, name = target.partition(":")
    app = getattr(importlib.import_module(module), name)
    server = Server(app, port=port, interface=Interfaces.ASGI, log_enabled=False)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.stop)
    await server.serve()


def main() -> None:
    """Serve ``sys.argv[1]`` on 127.0.0.1, port ``sys.argv[2]``, until SIGTERM."""
    uvloop.run(_serve(sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    main()
