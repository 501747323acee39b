"""The body of a streaming response: timeouts, heartbeats, coalescing, clean stops.

The service's HTTP connection has the body send itself (:meth:`StreamBody.send_to`;
Quart would iterate it, ``async for chunk``, and send each chunk); the server's send
waits while the socket is full. An async generator is pulled inline by the task that
sends (``_inline.py``), so a slow client slows the generator itself; a sync iterator
runs on the pool and fills a bounded channel (``_pumps.py``). Either way memory stays
bounded end to end.

Each step returns every event that is ready as one chunk, so events produced together
(a burst, or tokens that arrived while the last write was in flight) cost one
``send`` (the server's per-send cost dominates SSE, docs/benchmarks.md), while an event
produced alone is sent at once.

Timeouts, heartbeats and the metrics tallies run on one clock per worker
(:class:`StreamHub`): a periodic tick looks at every open stream, so a stream's own
step costs no timer, no clock read and no metric update per event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Iterable, Sequence
from contextvars import Context, ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from hypercorn.typing import ASGISendCallable, HTTPResponseBodyEvent
from quart.wrappers.response import ResponseBody

from ..config import Settings
from ..executor import BoundedExecutor, Pool
from ..observability.metrics import Count, Counts, Metrics
from ..part import Readiness
from ._inline import ByHand, InlineSource, start_now
from ._pumps import ThreadSource
from .events import Encoder

__all__ = ["END_REASONS", "StreamBody", "StreamCounts", "StreamHub", "StreamPolicy"]

_log = logging.getLogger("quart_service.streaming")

# Bound on how long a stopped producer may take to run its finally blocks.
_STOP_GRACE = 5.0
# The clock's longest tick: tallies reach the metrics at least this often.
_TICK = 0.25
# Why a stream ended (the label of quart_service_stream_ends_total).
END_REASONS = ("completed", "disconnected", "idle_timeout", "total_timeout", "error", "shutdown")
# What the clock found due on a stream.
_HEARTBEAT: Final = "heartbeat"
_IDLE: Final = "idle_timeout"
_TOTAL: Final = "total_timeout"
_HEARTBEAT_FAILED: Final = "a heartbeat could not be written"  # the client left
# Streams the clock looks at in one callback: between slices the loop polls its
# sockets, so 10,000 streams' heartbeats never hold a request for long.
_SLICE = 64
_UNSET: Final = object()  # a context variable with no value in a context


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """Limits of one stream, in seconds; 0 turns a limit off."""

    idle_timeout: float
    total_timeout: float
    heartbeat: float
    buffer_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamPolicy:
        """The ``stream_*`` settings."""
        return cls(
            idle_timeout=settings.stream_idle_timeout,
            total_timeout=settings.stream_total_timeout,
            heartbeat=settings.stream_heartbeat,
            buffer_bytes=settings.stream_buffer_bytes,
        )


class StreamCounts:
    """This process's stream counts. Each also moves its metric (summed on /metrics),
    at the hub's next clock tick (:meth:`flush`), not on the stream's own path."""

    __slots__ = (
        "_active_gauge",
        "_active_shown",
        "active",
        "ends",
        "events",
        "heartbeats",
        "opened",
        "writes",
    )

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.active = 0
        self._active_shown = 0
        if metrics is None:
            self.opened, self.events, self.writes, self.heartbeats = (Count() for _ in range(4))
            self.ends = Counts()
            self._active_gauge: Any = None
            return
        self.opened = metrics.count(metrics.streams_opened)
        self.events = metrics.count(metrics.stream_events)
        self.writes = metrics.count(metrics.stream_writes)
        self.heartbeats = metrics.count(metrics.stream_heartbeats)
        self.ends = metrics.counts(metrics.stream_ends)
        self._active_gauge = metrics.streams_active

    def began(self) -> None:
        """A stream started."""
        self.opened.add()
        self.active += 1

    def ended(self, reason: str) -> None:
        """A stream ended, for ``reason`` (one of :data:`END_REASONS`)."""
        self.active -= 1
        self.ends.add(reason)

    def flush(self) -> None:
        """Move the counts to their metrics."""
        for count in (self.opened, self.events, self.writes, self.heartbeats):
            count.flush()
        self.ends.flush()
        if self._active_gauge is not None and self.active != self._active_shown:
            self._active_gauge.set(self.active)
            self._active_shown = self.active

    def as_dict(self) -> dict[str, int | float]:
        """A JSON-ready view: every count, every end reason (0 included)."""
        ends = self.ends.as_dict()
        return {
            "opened": self.opened.value,
            "active": self.active,
            "events": self.events.value,
            "writes": self.writes.value,
            "heartbeats": self.heartbeats.value,
            **{reason: ends.get(reason, 0) for reason in END_REASONS},
        }


class StreamHub:
    """This process's streams as a part of the worker: their policy and counts, the
    open ones, the clock that keeps their deadlines, and the shutdown that ends all of
    them at the drain deadline."""

    name = "streams"

    def __init__(
        self, policy: StreamPolicy, pool: Pool | None = None, reconnect_after: int = 1000
    ) -> None:
        self.policy = policy
        self.counts = StreamCounts()
        self.reconnect_after = reconnect_after  # ms, sent as SSE retry: at shutdown
        self.shutting_down = False
        self.open: set[StreamBody] = set()
        self._pool = pool
        # A quarter of the shortest limit, so a deadline is kept within 25 %; at most
        # _TICK, the metrics' delay. 10k open streams cost ~10 ms of CPU per second.
        limits = [x / 4 for x in (policy.heartbeat, policy.idle_timeout, policy.total_timeout)]
        self.tick = max(0.01, min([_TICK, *(x for x in limits if x > 0)]))
        self._clock: asyncio.Handle | None = None

    @property
    def executor(self) -> BoundedExecutor:
        """The pool that runs bridged sync iterators."""
        if self._pool is None:
            raise RuntimeError("this StreamHub has no pool: give it one to bridge sync iterators")
        return self._pool.executor

    def opened(self, body: StreamBody, loop: asyncio.AbstractEventLoop) -> None:
        """``body`` started: keep its deadlines (the clock runs while streams are open)."""
        self.open.add(body)
        self.counts.began()
        if self._clock is None:
            self._clock = loop.call_later(self.tick, self._on_tick, loop)

    def closed(self, body: StreamBody, reason: str) -> None:
        """``body`` ended, for ``reason``."""
        self.open.discard(body)
        self.counts.ended(reason)

    def shut_down(self) -> int:
        """End every open stream (and any opened later) with a shutdown event that
        tells the client to reconnect; returns how many were open."""
        self.shutting_down = True
        bodies = list(self.open)
        for body in bodies:
            body.shut_down()
        return len(bodies)

    async def start(self, metrics: Metrics) -> None:
        """Count streams into ``metrics``."""
        self.counts = StreamCounts(metrics)

    async def stop(self) -> None:
        """Stop the clock; open streams end with their connections."""
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        self.counts.flush()

    async def readiness(self) -> Readiness:
        """Streams never make a worker unready (the drain does)."""
        return Readiness()

    def identity(self) -> dict[str, int | float]:
        """This worker's stream counts."""
        return self.counts.as_dict()

    def _on_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tick_slice(loop, loop.time(), list(self.open), 0)

    def _tick_slice(
        self, loop: asyncio.AbstractEventLoop, now: float, bodies: list[StreamBody], start: int
    ) -> None:
        end = start + _SLICE
        for body in bodies[start:end]:
            try:
                body.tick(now)
            except Exception:  # one stream's bug must not stop every stream's clock
                _log.exception("a stream's clock tick failed")
        if end < len(bodies):
            # The rest after the loop has polled: requests that came meanwhile go first.
            self._clock = loop.call_soon(self._tick_slice, loop, now, bodies, end)
            return
        # The streams that ended since the last tick are counted here too: the clock
        # stops only after the tick that follows the last stream.
        self.counts.flush()
        self._clock = loop.call_later(self.tick, self._on_tick, loop) if self.open else None


class StreamBody(ResponseBody):
    """Streams what one producer yields, encoded, under a :class:`StreamPolicy`."""

    def __init__(
        self,
        source: AsyncIterable[Any] | Iterable[Any],
        encoder: Encoder,
        hub: StreamHub,
        executor: BoundedExecutor,
        context: Context,
    ) -> None:
        self._given = source
        self._encoder = encoder
        self._policy = hub.policy
        self._hub = hub
        self._executor = executor
        self._context = context
        self._source: InlineSource | ThreadSource | None = None
        self._started = self._last_data = self._last_write = 0.0
        self._ended_as = "completed"  # or why it ended early, for the metrics
        self._due: str | None = None  # what the clock found due
        self._done = False
        self._shutdown = False
        # The response's send (given to send_to), for heartbeats written beside a
        # waiting generator; a body iterated by hand has none, and no heartbeats.
        self._send: ASGISendCallable | None = None
        # Set only when iterated by hand (an empty list per stream was 56 bytes).
        self._restore: Sequence[tuple[ContextVar[Any], Token[Any]]] = ()
        self._by_hand: ByHand | None = None  # iterated by hand (async for), not sent
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> StreamBody:
        loop = self._loop = asyncio.get_running_loop()
        given, limit = self._given, self._policy.buffer_bytes
        if isinstance(given, AsyncIterable):
            # Which task runs the generator is decided by how the body is sent:
            # send_to() (a task of its own) or iteration by hand (__anext__).
            self._source = InlineSource(
                given, self._encoder.encode, limit, self._next_frame, loop, self._context
            )
        else:
            self._source = ThreadSource(
                iter(given),
                self._encoder.encode,
                limit,
                self._after_pull,
                self._executor,
                self._context,
                loop,
            )
        self._started = self._last_data = self._last_write = loop.time()
        self._hub.opened(self, loop)
        if self._hub.shutting_down:
            self._shutdown = self._source.interrupted = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            # The send failed or our task was cancelled: the client went away.
            self._ended_as = "disconnected"
        self._flush()
        self._hub.closed(self, self._ended_as)
        if self._source is not None and self._source.beat is not None:
            self._source.beat.cancel()
        try:
            await self._stop_producer()
        finally:
            for var, token in reversed(self._restore):
                var.reset(token)

    def __aiter__(self) -> StreamBody:
        return self

    def _pulled_here(self, source: InlineSource) -> ByHand:
        """The body is iterated by hand: the generator runs in this task. Give it the
        view's context (request, app, the service's accessors) for the stream's life:
        only the variables whose value differs here are set (Quart has popped its
        request and app contexts; the observer's are the same)."""
        source.task = asyncio.current_task()
        self._restore = [
            (var, var.set(value))
            for var, value in self._context.items()
            if var.get(_UNSET) is not value
        ]
        self._by_hand = ByHand(source)
        return self._by_hand

    def send_to(self, send: ASGISendCallable) -> Awaitable[None]:
        """Send the whole body with ``send`` (inside ``async with``): what the service's
        HTTP connection calls instead of iterating the body.

        An async generator is pulled by a task of its own, whose coroutine is the
        stream's loop itself, run in the view's context. Each event steps a task
        through every coroutine it awaits in, and the request's own task awaits in a
        dozen (Hypercorn's, Quart's, the observer's, the connection's): 1,800
        instructions per paced event, measured, that this two-deep task does not pay
        (docs/benchmarks.md)."""
        source = self._source
        assert source is not None, "send a StreamBody inside 'async with'"
        if isinstance(source, InlineSource):
            assert self._loop is not None
            self._send = send
            task = source.task = self._loop.create_task(source.stream(send), context=self._context)
            return task
        return self._send_each(send)

    async def _send_each(self, send: ASGISendCallable) -> None:
        async for chunk in self:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    def __anext__(self) -> Awaitable[bytes]:
        source = self._source
        assert source is not None, "iterate a StreamBody inside 'async with'"
        if isinstance(source, InlineSource):
            return (self._by_hand or self._pulled_here(source)).next()
        # A sync iterator's pull is its per-event path; this body steps in only when
        # something else is due (and when a pull brought nothing: _after_pull).
        if source.interrupted or source.finished:
            return self._after_pull()
        return source.pull()

    async def _next_frame(self) -> bytes | None:
        """The body's own frame instead of the next event (a shutdown, a due deadline,
        the producer's end), or None: pull on. ``StopAsyncIteration`` once the final
        frame went out."""
        source = self._source
        assert source is not None
        # What it was for is handled here (an ended producer stays interrupted).
        source.interrupted = source.finished
        if self._done:  # the final frame went out: nothing may follow it
            raise StopAsyncIteration
        return await self._special(source)

    async def _after_pull(self) -> bytes:
        """A sync iterator's next frame when a pull brought nothing or was cut."""
        frame = await self._next_frame()
        if frame is not None:
            return frame
        assert isinstance(self._source, ThreadSource)
        return await self._source.pull()

    async def _special(self, source: InlineSource | ThreadSource) -> bytes | None:
        """The frame for a shutdown, a due deadline or the producer's end; None: go on."""
        if self._shutdown:
            return await self._end_for_shutdown()
        due, self._due = self._due, None
        if due is not None:
            frame = await self._on_due(due)
            if frame is not None:
                return frame
        if source.finished or source.failure is not None:  # ended, or failed to encode
            return self._end(source.failure)
        return None

    def shut_down(self) -> None:
        """End this stream at its next step with a shutdown event (drain deadline)."""
        self._shutdown = True
        if self._source is not None:
            self._source.interrupted = True
            if self._source.pulling:
                self._source.cut()

    def tick(self, now: float) -> None:
        """The hub's clock: move the tallies to the metrics, and find what is due."""
        source = self._source
        if source is None:
            return
        if source.writes:
            self._last_data = self._last_write = now
        self._flush()
        if not source.pulling:
            # Sending (a slow client): the producer is not silent, it is held back.
            self._last_data = self._last_write = now
        policy = self._policy
        if policy.total_timeout > 0 and now >= self._started + policy.total_timeout:
            due: str | None = _TOTAL
        elif policy.idle_timeout > 0 and now >= self._last_data + policy.idle_timeout:
            due = _IDLE
        elif policy.heartbeat > 0 and now >= self._last_write + policy.heartbeat:
            if isinstance(source, InlineSource):
                self._write_beside(source, now)  # never interrupt the generator for it
                return
            due = _HEARTBEAT
        else:
            return
        self._due = due
        source.interrupted = True
        if source.pulling:
            source.cut()

    # -- internals ----------------------------------------------------------------------

    def _write_beside(self, source: InlineSource, now: float) -> None:
        """A heartbeat written at once, while the generator waits: the server's send
        is run right here, and only if it must wait (the socket is full) does a task
        finish it. A task per heartbeat cost ~30 µs, and thousands of them alive at
        once outlived young collections into the old generation, which then set off
        full collections of the whole heap (docs/design.md, pitfall 16)."""
        send, heartbeat = self._send, self._encoder.heartbeat
        if send is None or heartbeat is None or self._loop is None:
            return  # no server send to write with (a body driven by hand)
        if source.beat is not None and not source.beat.done():
            return
        self._last_write = now
        self._hub.counts.heartbeats.add()
        message: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": heartbeat,
            "more_body": True,
        }
        beat = source.beat = start_now(send(message), self._loop, _HEARTBEAT_FAILED)
        if beat is not None:  # a held, finished task cost an idle stream 0.6 KB
            beat.add_done_callback(lambda _: setattr(source, "beat", None))
            source.interrupted = True  # the next write waits for it

    def _flush(self) -> None:
        """Move this stream's tallies to the worker's counts."""
        source, counts = self._source, self._hub.counts
        if source is None:
            return
        if source.writes:
            counts.events.add(source.writes + source.joined)
            counts.writes.add(source.writes)
            source.writes = source.joined = 0

    async def _on_due(self, due: str) -> bytes | None:
        """The final frame for a timeout, a heartbeat, or None (nothing to send)."""
        policy = self._policy
        if due == _TOTAL:
            self._ended_as = _TOTAL
            message = f"The stream reached its limit of {policy.total_timeout:g} s."
            return await self._finish(self._encoder.error("stream_total_timeout", message))
        if due == _IDLE:
            self._ended_as = _IDLE
            message = f"No event for {policy.idle_timeout:g} s; the stream was ended."
            return await self._finish(self._encoder.error("stream_idle_timeout", message))
        heartbeat = self._encoder.heartbeat
        if heartbeat is None:
            return None
        self._last_write = asyncio.get_running_loop().time()
        self._hub.counts.heartbeats.add()
        return heartbeat

    def _end(self, failure: tuple[str, str] | None) -> bytes:
        self._done_now()
        if failure is None:
            raise StopAsyncIteration
        self._ended_as = "error"
        return self._encoder.error(*failure)

    async def _end_for_shutdown(self) -> bytes:
        self._ended_as = "shutdown"
        retry = self._hub.reconnect_after
        message = f"The server is shutting down; reconnect in {retry} ms."
        return await self._finish(self._encoder.error("shutdown", message, retry=retry))

    async def _finish(self, frame: bytes) -> bytes:
        self._done_now()
        self._shutdown = False  # the final frame is sent once
        await self._stop_producer()
        return frame

    def _done_now(self) -> None:
        """The final frame is going out: every later step ends the body."""
        self._done = True
        if self._source is not None:
            self._source.interrupted = True

    async def _stop_producer(self) -> None:
        source = self._source
        if source is None or source.finished:
            return
        if isinstance(source, ThreadSource):
            source.stop()
            return
        # The generator may await in its finally blocks: give it _STOP_GRACE, in a task
        # of its own so that a generator ignoring cancellation cannot hold this one.
        closing = source.closing()
        if closing is None:
            return
        done, _ = await asyncio.wait({closing}, timeout=_STOP_GRACE)
        if not done:
            closing.cancel()
            _log.warning("a stream producer ignored cancellation for %s s", _STOP_GRACE)
        elif not closing.cancelled() and closing.exception() is not None:
            _log.error("closing a stream producer failed", exc_info=closing.exception())
