"""What the app keeps per held idle stream, in one process, with no server.

    python -m bench.held_memory [--streams 2000] [--stacks service,bare,asgi] [--types]

Each stack's ``GET /idle`` (``bench.apps``, ``bench.idle_asgi``) is called through
its ASGI callable, with a ``receive`` that gives the (empty) body and then waits, and
a ``send`` that only notes the first event. Once every stream has sent its first
event, the memory ``tracemalloc`` traces, and the objects the garbage collector
tracks, are counted against the figures before the streams: what one held stream
costs the app itself (framework, service, generator), without what a server's
connection costs beside it (``bench.idle_streams`` measures the whole worker). The
same run gives the same bytes to a few dozen, so a change of a hundred bytes shows.

``--types`` lists the objects added per stream by type (coroutines by function),
with their ``sys.getsizeof``: what holds the memory, not where it was allocated.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bench._asgi import http_scope

Message = MutableMapping[str, Any]
App = Callable[[Any, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Any]

_HEADERS = [(b"host", b"127.0.0.1"), (b"user-agent", b"bench")]
_WARM = 50  # streams opened and closed first: caches, interned names, lazy imports


class _Client:
    """One held connection's ASGI side: the body at once, then nothing until closed."""

    __slots__ = ("_body_given", "closed", "first_event")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._body_given = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self.first_event: asyncio.Future[None] = loop.create_future()

    async def receive(self) -> Message:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.closed
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        first = message["type"] == "http.response.body" and message.get("body")
        if first and not self.first_event.done():
            self.first_event.set_result(None)


async def _started(app: App) -> Callable[[], Awaitable[None]]:
    """Run the app's lifespan start-up (its parts start, as in a worker); returns
    what shuts it down."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    held: asyncio.Future[None] = loop.create_future()
    messages = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await held
        return {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        if message["type"].startswith("lifespan.startup") and not started.done():
            started.set_result(None)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = loop.create_task(app(scope, receive, send))
    await started

    async def shut_down() -> None:
        held.set_result(None)
        await asyncio.wait_for(lifespan, 30)

    return shut_down


async def _open(app: App, count: int) -> tuple[list[_Client], list[asyncio.Task[Any]]]:
    loop = asyncio.get_running_loop()
    clients = [_Client(loop) for _ in range(count)]
    # A scope of its own per stream, as a server makes one per request.
    tasks = [
        loop.create_task(app(http_scope("/idle", [*_HEADERS]), c.receive, c.send)) for c in clients
    ]
    await asyncio.wait_for(asyncio.gather(*(c.first_event for c in clients)), 120)
    return clients, tasks


async def _close(clients: list[_Client], tasks: list[asyncio.Task[Any]]) -> None:
    for client in clients:
        client.closed.set_result(None)
    await asyncio.wait(tasks, timeout=30)


def _label(thing: object) -> str:
    name = type(thing).__name__
    qualname = getattr(thing, "__qualname__", None)
    if name in ("coroutine", "generator", "async_generator", "method") and qualname:
        return f"{name} {qualname}"
    return name


async def _measure(stack: str, streams: int, types: bool) -> None:
    app = _load(stack)
    shut_down = await _started(app)
    await _close(*await _open(app, _WARM))
    await asyncio.sleep(0.1)
    gc.collect()
    before = {id(thing) for thing in gc.get_objects()} if types else set()
    objects = len(gc.get_objects())
    tracemalloc.start()
    traced = tracemalloc.get_traced_memory()[0]
    clients, tasks = await _open(app, streams)
    await asyncio.sleep(0.2)
    gc.collect()
    added = tracemalloc.get_traced_memory()[0] - traced
    tracemalloc.stop()
    added_objects = len(gc.get_objects()) - objects
    print(
        f"{stack}: {added / streams:,.0f} B traced and "
        f"{added_objects / streams:.1f} gc-tracked objects per held stream ({streams:,} held)"
    )
    if types:
        sizes: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for thing in gc.get_objects():
            if id(thing) not in before and thing is not before:
                label = _label(thing)
                counts[label] += 1
                sizes[label] += sys.getsizeof(thing)
        for label, size in sizes.most_common(40):
            if size / streams >= 40:
                print(f"  {size / streams:7,.0f} B  {counts[label] / streams:5.2f}  {label}")
    await _close(clients, tasks)
    await shut_down()


def _load(stack: str) -> App:
    if stack == "asgi":
        from bench.idle_asgi import app as asgi

        return asgi
    import bench.apps

    app: App = getattr(bench.apps, stack)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--stacks", default="service,bare,asgi")
    parser.add_argument("--types", action="store_true", help="the objects added, by type")
    args = parser.parse_args()
    os.environ.setdefault("QUART_SERVICE_ACCESS_LOG", "0")  # no line per stream closed
    for stack in args.stacks.split(","):
        # One stack per process: imports, caches and the heap start alike.
        if os.fork() == 0:
            import uvloop

            uvloop.run(_measure(stack, args.streams, args.types))
            sys.stdout.flush()
            os._exit(0)
        os.wait()


if __name__ == "__main__":
    main()
