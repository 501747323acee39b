"""The body of a streaming response: timeouts, heartbeats, coalescing, clean stops.

Quart sends a response body by iterating it (``async with body: async for chunk``) and
awaits each ``send``; Hypercorn's send waits while the socket is full, so a slow client
slows this iterator, which stops taking from the bounded channel, which stops the
producer: memory stays bounded end to end.

Each step takes *everything* the producer has buffered and returns it as one chunk, so
events produced together cost one ``send`` (Hypercorn's per-send cost dominates SSE,
DESIGN.md section 9) while an event produced alone is sent at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Iterable
from contextvars import Context
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from quart.wrappers.response import ResponseBody

from ..executor import BoundedExecutor
from ..metrics.families import ServiceMetrics, process_metrics
from ._channel import Channel
from ._pumps import ThreadPump, pump_async
from .events import Encoder

__all__ = ["StreamBody", "StreamCounters", "StreamHub", "StreamPolicy"]

log = logging.getLogger("quart_service.streaming")

# Bound on how long a stopped producer may take to run its finally blocks.
_STOP_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """Limits of one stream, in seconds; 0 turns a limit off."""

    idle_timeout: float
    total_timeout: float
    heartbeat: float
    buffer_bytes: int


@dataclass(slots=True)
class StreamCounters:
    """This process's stream counts (on /debug/identity; /metrics sums all workers)."""

    opened: int = 0
    active: int = 0
    completed: int = 0
    disconnected: int = 0
    idle_timeouts: int = 0
    total_timeouts: int = 0
    failed: int = 0
    events: int = 0
    writes: int = 0
    heartbeats: int = 0
    shutdowns: int = 0


class StreamHub:
    """This process's open streams: their counts, their metrics, and the shutdown
    that ends all of them at the drain deadline."""

    def __init__(self, reconnect_after: int = 1000) -> None:
        self.counters = StreamCounters()
        self.reconnect_after = reconnect_after  # ms, sent as SSE retry: at shutdown
        self.shutting_down = False
        self.open: set[StreamBody] = set()
        self._metrics: ServiceMetrics | None = None

    @property
    def metrics(self) -> ServiceMetrics:
        """The process's metrics (looked up on the first stream, after start-up)."""
        if self._metrics is None:
            self._metrics = process_metrics()
        return self._metrics

    def shut_down(self) -> int:
        """End every open stream (and any opened later) with a shutdown event that
        tells the client to reconnect; returns how many were open."""
        self.shutting_down = True
        bodies = list(self.open)
        for body in bodies:
            body.shut_down()
        return len(bodies)


class StreamBody(ResponseBody):
    """Streams what one producer yields, encoded, under a :class:`StreamPolicy`."""

    def __init__(
        self,
        source: AsyncIterable[Any] | Iterable[Any],
        encoder: Encoder,
        policy: StreamPolicy,
        hub: StreamHub,
        executor: BoundedExecutor,
        context: Context,
    ) -> None:
        self._source = source
        self._encoder = encoder
        self._policy = policy
        self._hub = hub
        self._counters = hub.counters
        self._metrics = hub.metrics
        self._executor = executor
        self._context = context
        self._channel: Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._pump: ThreadPump | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = self._last_data = self._last_write = 0.0
        self._final: bytes | None = None  # an error frame still to send
        self._ended_as = "completed"  # or why it ended early, for the metrics
        self._done = False
        self._shutdown = False

    async def __aenter__(self) -> StreamBody:
        loop = self._loop = asyncio.get_running_loop()
        channel = self._channel = Channel(loop, self._policy.buffer_bytes)
        self._started = self._last_data = self._last_write = loop.time()
        source = self._source
        if isinstance(source, AsyncIterable):
            coro = pump_async(source, self._encoder.encode, channel)
            self._task = loop.create_task(coro, context=self._context)
        else:
            self._pump = ThreadPump(
                iter(source), self._encoder.encode, channel, self._executor, self._context, loop
            )
            self._pump.start()
        self._counters.opened += 1
        self._counters.active += 1
        self._metrics.streams_opened.inc()
        self._metrics.streams_active.inc()
        self._hub.open.add(self)
        if self._hub.shutting_down:
            self._shutdown = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        counters = self._counters
        counters.active -= 1
        self._hub.open.discard(self)
        if exc_type is not None:
            # The send failed or our task was cancelled: the client went away.
            counters.disconnected += 1
            self._ended_as = "disconnected"
        elif self._channel is not None and self._channel.end_reason is None and not self._final:
            counters.completed += 1
        metrics = self._metrics
        metrics.streams_active.dec()
        metrics.stream_ends.labels(self._ended_as).inc()
        await self._stop_producer()

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        channel = self._channel
        assert channel is not None, "iterate a StreamBody inside 'async with'"
        if self._shutdown or self._done:
            if self._done:  # the final frame went out: nothing may follow it
                raise StopAsyncIteration
            return await self._end_for_shutdown()
        taken = channel.take()
        if taken is None:
            return await self._wait_for_more(channel)
        return self._sent(taken)

    def shut_down(self) -> None:
        """End this stream at its next step with a shutdown event (drain deadline)."""
        self._shutdown = True
        if self._channel is not None:
            self._channel.interrupt()

    # -- internals ----------------------------------------------------------------------

    def _sent(self, taken: tuple[bytes, int]) -> bytes:
        data, count = taken
        counters = self._counters
        counters.events += count
        counters.writes += 1
        self._metrics.stream_events.inc(count)
        self._metrics.stream_writes.inc()
        assert self._loop is not None
        self._last_data = self._last_write = self._loop.time()
        return data

    async def _wait_for_more(self, channel: Channel) -> bytes:
        loop = self._loop
        assert loop is not None
        policy = self._policy
        heartbeat = self._encoder.heartbeat if policy.heartbeat > 0 else None
        while True:
            taken = channel.take()
            if taken is not None:
                return self._sent(taken)
            if self._done:
                raise StopAsyncIteration
            if self._shutdown:
                return await self._end_for_shutdown()
            if channel.ended:
                return self._end(channel)
            now = loop.time()
            deadline: float | None = None
            if policy.total_timeout > 0:
                total_at = self._started + policy.total_timeout
                if now >= total_at:
                    return await self._end_early(
                        "stream_total_timeout",
                        f"The stream reached its limit of {policy.total_timeout:g} s.",
                    )
                deadline = total_at
            if policy.idle_timeout > 0:
                idle_at = self._last_data + policy.idle_timeout
                if now >= idle_at:
                    return await self._end_early(
                        "stream_idle_timeout",
                        f"No event for {policy.idle_timeout:g} s; the stream was ended.",
                    )
                deadline = idle_at if deadline is None else min(deadline, idle_at)
            if heartbeat is not None:
                beat_at = self._last_write + policy.heartbeat
                if now >= beat_at:
                    self._last_write = now
                    self._counters.heartbeats += 1
                    self._metrics.stream_heartbeats.inc()
                    return heartbeat
                deadline = beat_at if deadline is None else min(deadline, beat_at)
            await channel.wait(deadline)

    def _end(self, channel: Channel) -> bytes:
        self._done = True
        reason = channel.end_reason
        if reason is None:
            raise StopAsyncIteration
        self._counters.failed += 1
        self._ended_as = "error"
        self._final = self._encoder.error(*reason)
        return self._final

    async def _end_early(self, code: str, message: str) -> bytes:
        if code == "stream_idle_timeout":
            self._counters.idle_timeouts += 1
            self._ended_as = "idle_timeout"
        else:
            self._counters.total_timeouts += 1
            self._ended_as = "total_timeout"
        return await self._finish(self._encoder.error(code, message))

    async def _end_for_shutdown(self) -> bytes:
        self._counters.shutdowns += 1
        self._ended_as = "shutdown"
        retry = self._hub.reconnect_after
        message = f"The server is shutting down; reconnect in {retry} ms."
        return await self._finish(self._encoder.error("shutdown", message, retry=retry))

    async def _finish(self, frame: bytes) -> bytes:
        self._done = True
        self._shutdown = False  # the final frame is sent once
        self._final = frame
        await self._stop_producer()
        return frame

    async def _stop_producer(self) -> None:
        if self._pump is not None:
            self._pump.stop()
            self._pump = None
        task, self._task = self._task, None
        if self._channel is not None:
            self._channel.close()
        if task is not None and not task.done():
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=_STOP_GRACE)
            if not done:
                log.warning("a stream producer ignored cancellation for %s s", _STOP_GRACE)
