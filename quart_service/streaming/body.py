"""The body of a streaming response: timeouts, heartbeats, coalescing, clean stops.

Quart sends a response body by iterating it (``async with body: async for chunk``) and
awaits each ``send``; Hypercorn's send waits while the socket is full, so a slow client
slows this iterator, which stops taking from the bounded channel, which stops the
producer: memory stays bounded end to end.

Each step takes *everything* the producer has buffered and returns it as one chunk, so
events produced together cost one ``send`` (Hypercorn's per-send cost dominates SSE,
docs/benchmarks.md) while an event produced alone is sent at once.
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

from ..config import Settings
from ..executor import BoundedExecutor, Pool
from ..observability.metrics import Count, Counts, Metrics
from ..part import Readiness
from ._channel import Channel
from ._pumps import ThreadPump, pump_async
from .events import Encoder

__all__ = ["END_REASONS", "StreamBody", "StreamCounts", "StreamHub", "StreamPolicy"]

_log = logging.getLogger("quart_service.streaming")

# Bound on how long a stopped producer may take to run its finally blocks.
_STOP_GRACE = 5.0
# How often a stream moves its event and write tallies to the metrics (and at its end).
_FLUSH_EVERY = 0.25
# Why a stream ended (the label of quart_service_stream_ends_total).
END_REASONS = ("completed", "disconnected", "idle_timeout", "total_timeout", "error", "shutdown")


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
    """This process's stream counts; each also moves its metric (summed on /metrics)."""

    __slots__ = ("_active_gauge", "active", "ends", "events", "heartbeats", "opened", "writes")

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.active = 0
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
        self.opened.inc()
        self.active += 1
        if self._active_gauge is not None:
            self._active_gauge.inc()

    def ended(self, reason: str) -> None:
        """A stream ended, for ``reason`` (one of :data:`END_REASONS`)."""
        self.active -= 1
        self.ends.inc(reason)
        if self._active_gauge is not None:
            self._active_gauge.dec()

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
    open ones, and the shutdown that ends all of them at the drain deadline."""

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

    @property
    def executor(self) -> BoundedExecutor:
        """The pool that runs bridged sync iterators."""
        if self._pool is None:
            raise RuntimeError("this StreamHub has no pool: give it one to bridge sync iterators")
        return self._pool.executor

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
        """Nothing to release: open streams end with their connections."""

    async def readiness(self) -> Readiness:
        """Streams never make a worker unready (the drain does)."""
        return Readiness()

    def identity(self) -> dict[str, int | float]:
        """This worker's stream counts."""
        return self.counts.as_dict()


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
        self._source = source
        self._encoder = encoder
        self._policy = hub.policy
        self._hub = hub
        self._counts = hub.counts
        self._executor = executor
        self._context = context
        self._channel: Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._pump: ThreadPump | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = self._last_data = self._last_write = 0.0
        self._final: bytes | None = None  # an error frame still to send
        self._ended_as = "completed"  # or why it ended early, for the metrics
        # Events and writes are tallied here and moved to the worker's counts (and
        # their metrics) at most every _FLUSH_EVERY s and at the end: one metric
        # update per write cost as much as the write itself on a paced stream.
        self._events = self._writes = 0
        self._flushed_at = 0.0
        self._done = False
        self._shutdown = False

    async def __aenter__(self) -> StreamBody:
        loop = self._loop = asyncio.get_running_loop()
        channel = self._channel = Channel(loop, self._policy.buffer_bytes)
        self._started = self._last_data = self._last_write = self._flushed_at = loop.time()
        source = self._source
        if isinstance(source, AsyncIterable):
            coro = pump_async(source, self._encoder.encode, channel)
            self._task = loop.create_task(coro, context=self._context)
        else:
            self._pump = ThreadPump(
                iter(source), self._encoder.encode, channel, self._executor, self._context, loop
            )
            self._pump.start()
        self._counts.began()
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
        self._hub.open.discard(self)
        if exc_type is not None:
            # The send failed or our task was cancelled: the client went away.
            self._ended_as = "disconnected"
        self._flush()
        self._counts.ended(self._ended_as)
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
        self._events += count
        self._writes += 1
        assert self._loop is not None
        now = self._last_data = self._last_write = self._loop.time()
        if now - self._flushed_at >= _FLUSH_EVERY:
            self._flush(now)
        return data

    def _flush(self, now: float | None = None) -> None:
        """Move this stream's tallies to the worker's counts."""
        if self._events:
            self._counts.events.inc(self._events)
        if self._writes:
            self._counts.writes.inc(self._writes)
        self._events = self._writes = 0
        if now is not None:
            self._flushed_at = now

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
                    self._counts.heartbeats.inc()
                    return heartbeat
                deadline = beat_at if deadline is None else min(deadline, beat_at)
            await channel.wait(deadline)

    def _end(self, channel: Channel) -> bytes:
        self._done = True
        reason = channel.end_reason
        if reason is None:
            raise StopAsyncIteration
        self._ended_as = "error"
        self._final = self._encoder.error(*reason)
        return self._final

    async def _end_early(self, code: str, message: str) -> bytes:
        self._ended_as = "idle_timeout" if code == "stream_idle_timeout" else "total_timeout"
        return await self._finish(self._encoder.error(code, message))

    async def _end_for_shutdown(self) -> bytes:
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
                _log.warning("a stream producer ignored cancellation for %s s", _STOP_GRACE)
