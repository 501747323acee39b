"""The app ``bench.process_model`` serves: the service with two more routes.

* ``GET /pm/upstream`` — a call that awaits an upstream for ``BENCH_UPSTREAM_MS``
  (50 ms): an ``await``, as the ``upstream`` engine's call is; no pool thread, no CPU
  while it waits;
* ``GET /pm/lookup?key=K`` — a cached lookup (``quart_service.cached``): on a miss its
  loader runs one database statement (``SELECT`` over the models table, counted as a
  ``read``) and builds a small value; the key distribution is the client's (Zipf).

Everything else (``/v1/completions`` on the ``local`` and ``neural`` engines, paced
streams) is the service's own API. Settings come from the environment.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from quart import Blueprint, request

from quart_service import cached, create_app, database

UPSTREAM_SECONDS = float(os.environ.get("BENCH_UPSTREAM_MS", "50")) / 1000

bp = Blueprint("process_model_bench", __name__)


@bp.get("/pm/upstream")
async def upstream() -> dict[str, Any]:
    await asyncio.sleep(UPSTREAM_SECONDS)  # the upstream's answer arrives
    return {"pid": os.getpid(), "answer": "ok"}


@bp.get("/pm/lookup")
async def lookup() -> dict[str, Any]:
    key = request.args.get("key", "0")

    async def load() -> dict[str, Any]:
        row = await database().fetchone("SELECT count(*), ? FROM models", (key,), kind="read")
        digest = hashlib.sha256(key.encode()).hexdigest()
        return {"key": key, "models": row[0] if row else 0, "digest": digest}

    value = await cached(f"item:{key}", load)
    return {"pid": os.getpid(), **value}


app = create_app(blueprints=[bp])
