"""The Flask app ``bench.thread_per_stream`` runs on Gunicorn's threaded workers (gthread).

* ``GET /hello`` — a small JSON answer with the worker's pid;
* ``GET /idle``  — an SSE stream written the Flask way, from a generator: one event,
  then a ``: keep-alive`` comment every ``BENCH_HEARTBEAT`` seconds (2), forever. Under
  a WSGI server the generator runs on the thread that serves the connection, so each
  open stream holds one thread until the client leaves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "2"))

app = Flask("flask_streams")


@app.get("/hello")
def hello() -> dict[str, Any]:
    return {"message": "hello", "pid": os.getpid()}


@app.get("/idle")
def idle() -> Response:
    def produce() -> Iterator[bytes]:
        yield b'data: {"token":"hello"}\n\n'
        while True:
            time.sleep(HEARTBEAT)  # this thread is held for the whole stream
            yield b": keep-alive\n\n"

    return Response(
        produce(),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
