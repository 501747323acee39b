"""A test app on the chassis: slow and limited resources, sync views, bridged streams.

Started by the end-to-end tests under a real Hypercorn (``tests.apps.chassis:app``).
Observations that must cross the process boundary (a factory ran, a generator's
``finally`` ran) are appended as JSON lines to the file named by ``TEST_EVENTS_FILE``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from quart import Blueprint, Response, request

from quart_service import Resource, cached, create_app, resources, snapshot, sse

EVENTS_FILE = os.environ.get("TEST_EVENTS_FILE", "")
SLOW_CREATE_SECONDS = float(os.environ.get("TEST_SLOW_CREATE_SECONDS", "0.5"))


def record(kind: str, **fields: Any) -> None:
    """Append one observation for the test process to read."""
    if not EVENTS_FILE:
        return
    line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **fields})
    # One write() of a short line in append mode: lines from workers never interleave.
    with open(EVENTS_FILE, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


class Model:
    """Stands in for an expensive singleton (a model, a client)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def predict(self, ms: float) -> str:
        time.sleep(ms / 1000)
        return threading.current_thread().name


async def make_slow() -> Model:
    record("created", resource="slow")
    await asyncio.sleep(SLOW_CREATE_SECONDS)
    return Model("slow")


def _model_factory(name: str) -> Resource[Model]:
    async def factory() -> Model:
        record("created", resource=name)
        return Model(name)

    return Resource(name, factory, limit=4)


SLOW = Resource("slow", make_slow)
MODELS = [_model_factory(f"model{i}") for i in range(10)]

bp = Blueprint("chassis_test", __name__)


@bp.get("/slow")
async def use_slow() -> dict[str, Any]:
    registry = resources()
    await registry.get(SLOW)
    status = next(s for s in registry.status() if s.name == "slow")
    return {"pid": os.getpid(), "instance_id": status.instance_id}


@bp.get("/block")
def block() -> dict[str, Any]:
    """A plain def view: Quart runs it on the loop's default executor (our pool)."""
    ms = float(request.args.get("ms", "5"))
    time.sleep(ms / 1000)
    return {"pid": os.getpid(), "thread": threading.current_thread().name}


@bp.get("/wait")
async def wait() -> dict[str, Any]:
    """A plain view that waits long: records how its wait ended."""
    tag = request.args.get("tag", "")
    try:
        await asyncio.sleep(float(request.args.get("seconds", "30")))
    except asyncio.CancelledError:
        record("view_cancelled", tag=tag)
        raise
    return {"pid": os.getpid(), "tag": tag}


@bp.get("/model/<int:index>")
async def use_model(index: int) -> dict[str, Any]:
    spec = MODELS[index % len(MODELS)]
    model = await resources().get(spec)
    thread = await resources().run_sync(spec, model.predict, float(request.args.get("ms", "5")))
    return {"pid": os.getpid(), "thread": thread}


@bp.get("/sync-stream")
async def sync_stream() -> Response:
    count = int(request.args.get("count", "20"))
    delay = float(request.args.get("delay", "0.001"))
    tag = request.args.get("tag", "")

    def produce() -> Iterator[dict[str, Any]]:
        try:
            for n in range(count):
                time.sleep(delay)
                yield {"n": n, "thread": threading.current_thread().name}
        finally:
            # GeneratorExit from close() lands here, in a pool thread.
            record("sync_closed", tag=tag, thread=threading.current_thread().name)

    return sse(produce())


@bp.get("/async-stream")
async def async_stream() -> Response:
    count = int(request.args.get("count", "1000000"))
    delay = float(request.args.get("delay", "0.05"))
    size = int(request.args.get("size", "16"))
    tag = request.args.get("tag", "")
    payload = "x" * size

    async def produce() -> AsyncIterator[dict[str, Any]]:
        produced = 0
        try:
            for n in range(count):
                produced = n + 1
                yield {"n": n, "payload": payload}
                if delay:
                    await asyncio.sleep(delay)
        finally:
            record("async_finally", tag=tag, produced=produced)

    return sse(produce())


@bp.get("/quiet-stream")
async def quiet_stream() -> Response:
    """One event, then silence for ``quiet`` seconds, then one more."""
    quiet = float(request.args.get("quiet", "3"))

    async def produce() -> AsyncIterator[str]:
        yield "first"
        await asyncio.sleep(quiet)
        yield "second"

    return sse(produce())


@bp.get("/raw-stream")
async def raw_stream() -> Response:
    """A plain Quart streaming response, without the service's helper (the control)."""

    async def produce() -> AsyncIterator[bytes]:
        for n in range(11):
            yield f"data: {n}\n\n".encode()
            await asyncio.sleep(0.5)

    return Response(produce(), content_type="text/event-stream")


@bp.get("/data")
async def data() -> dict[str, Any]:
    """What this worker's snapshot says."""
    snap = await snapshot()
    return {
        "pid": os.getpid(),
        "generation": snap.generation,
        "versions": snap.versions(),
        "models": {name: dict(m.parameters) for name, m in snap.models.items()},
    }


@bp.get("/cached/<name>")
async def cached_value(name: str) -> dict[str, Any]:
    """A slow load from the snapshot, behind the generation-scoped cache."""
    snap = await snapshot()

    async def load() -> Any:
        record("loaded", key=name, generation=snap.generation)
        await asyncio.sleep(0.3)
        model = snap.models.get(name)
        return None if model is None else model.parameters.get("v")

    value = await cached(name, load)
    return {"pid": os.getpid(), "generation": snap.generation, "value": value}


app = create_app(resources=[SLOW, *MODELS], blueprints=[bp])


# Routes for tests/test_metrics_families_e2e.py, added on the app itself: the blueprint
# above is registered already (a blueprint takes no routes after that).


@app.get("/failing-stream")
async def failing_stream() -> Response:
    """One event, then the producer raises: the stream ends with an error event."""

    async def produce() -> AsyncIterator[str]:
        yield "before"
        raise RuntimeError("the producer failed on purpose")

    return sse(produce())


@app.get("/cached-error/<name>")
async def cached_error(name: str) -> dict[str, Any]:
    """A cache miss whose loader raises: nothing is cached, the request fails (500)."""

    async def load() -> Any:
        raise RuntimeError(f"loading {name!r} failed on purpose")

    value = await cached(f"error:{name}", load)
    return {"pid": os.getpid(), "value": value}
