"""A sync iterator as a stream's source: run on the shared pool, through a :class:`Channel`.

The sync bridge does not hop to a thread for every item, as Quart's
``run_sync_iterable`` does (quart/utils.py; docs/design.md, pitfall 4): one pool job
runs the iterator until the channel is full, then *parks* and gives its thread back; the consumer
resumes it once the slow client took the data. A thread is therefore held only
while the iterator is actually producing, never while a client is slow.

Stopping: the consumer closes the channel; a running job sees it at the next item
boundary and calls the iterator's ``close()`` in its own thread; a parked one gets a
fresh pool job for that ``close()``. The iterator is never touched by two threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextvars import Context
from typing import Any

from ..executor import BoundedExecutor
from ._channel import Channel
from ._inline import FAILED, SourceState

_log = logging.getLogger("quart_service.streaming")


class ThreadPump:
    """Runs a sync iterator on the shared pool in batches, with backpressure."""

    __slots__ = ("_channel", "_context", "_encode", "_executor", "_iterator", "_loop")

    def __init__(
        self,
        iterator: Iterator[Any],
        encode: Callable[[Any], bytes],
        channel: Channel,
        executor: BoundedExecutor,
        context: Context,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._iterator = iterator
        self._encode = encode
        self._channel = channel
        self._executor = executor
        self._context = context
        self._loop = loop

    def start(self) -> None:
        """Queue the first job (admission was checked when the response was made)."""
        self._submit(self._step)

    def stop(self) -> None:
        """The consumer is gone: make sure the iterator is closed, in the pool."""
        if self._channel.close():
            # Parked: no job runs it, so close it in a job of its own.
            self._submit(self._close_iterator)

    def _submit(self, job: Callable[[], None]) -> None:
        try:
            self._executor.submit_admitted(self._context.run, job)
        except RuntimeError:
            # The pool is shut down (process exit): run it here rather than leak it.
            self._context.run(job)

    def _step(self) -> None:
        # Runs in a pool thread. Exits either parked (the iterator stays open and
        # exactly one party resumes or closes it) or with the iterator closed.
        channel, encode, iterator = self._channel, self._encode, self._iterator
        parked = False
        try:
            while not channel.closed:
                try:
                    item = next(iterator)
                except StopIteration:
                    channel.finish_threadsafe(None)
                    return
                if channel.put_threadsafe(encode(item)) and channel.park(self._on_space):
                    parked = True
                    return
        except Exception:
            _log.exception("stream producer failed")
            channel.finish_threadsafe(FAILED)
        finally:
            if not parked:
                self._close_iterator()

    def _on_space(self) -> None:
        # Called on the loop by the consumer's take(); the channel cleared the flag.
        self._submit(self._step)

    def _close_iterator(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                _log.exception("closing a stream's iterator failed")


class ThreadSource(SourceState):
    """A sync iterator pulled like :class:`~._inline.InlineSource`: ``pull`` waits for
    what the pool thread buffered and takes all of it. Its ``beat`` stays None: its
    heartbeats come from ``pull``."""

    __slots__ = ("_channel", "_cut", "_on_empty", "_pump")

    def __init__(
        self,
        iterator: Iterator[Any],
        encode: Callable[[Any], bytes],
        limit: int,
        on_empty: Callable[[], Awaitable[bytes]],
        executor: BoundedExecutor,
        context: Context,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__()
        self._on_empty = on_empty
        self._channel = Channel(loop, limit)
        self._pump = ThreadPump(iterator, encode, self._channel, executor, context, loop)
        self._pump.start()
        self._cut = False

    async def pull(self) -> bytes:
        """Everything buffered, once there is something. At the end, or when
        :meth:`cut` cut the wait short, the body's ``on_empty`` decides instead."""
        channel = self._channel
        self.pulling = True
        try:
            while True:
                taken = channel.take()
                if taken is not None:
                    data, count = taken
                    self.joined += count - 1
                    self.writes += 1
                    return data
                if channel.ended:
                    self.finished, self.failure = True, channel.end_reason
                    break
                if self._cut:
                    self._cut = False
                    break
                await channel.wait()
        finally:
            self.pulling = False
        return await self._on_empty()

    def cut(self) -> None:
        """End the current wait (the response has something else to send)."""
        self._cut = True
        self._channel.interrupt()

    def stop(self) -> None:
        """Stop the iterator (closed in a pool thread, never on the loop)."""
        self.finished = True
        self._pump.stop()
