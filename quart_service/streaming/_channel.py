"""A bounded byte channel from a sync iterator on the pool to one streaming response.

(An async generator needs none: the task that sends it pulls it inline, see _inline.py.)
The producer runs in a pool thread, so every operation it calls takes the lock and
wakes the loop with ``call_soon_threadsafe``, at most once per batch. The consumer
takes everything buffered in one go, which is how events produced together leave in
one write while none waits for more.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Final

# The producer ended: None for a clean end, (code, message) when it failed.
EndReason = tuple[str, str] | None
_OPEN: Final = object()


class Channel:
    """Buffered, bounded bytes; ``limit`` is in bytes (one item may exceed it alone)."""

    __slots__ = (
        "_chunks",
        "_count",
        "_end",
        "_limit",
        "_lock",
        "_loop",
        "_notified",
        "_on_space",
        "_parked",
        "_size",
        "_waiter",
        "closed",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = limit
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._size = 0
        self._count = 0
        self._end: object = _OPEN
        self._waiter: asyncio.Future[None] | None = None  # the consumer, waiting for data
        self._notified = False  # a thread already scheduled a wake-up
        self._parked = False  # a thread producer stopped for room; resume via _on_space
        self._on_space: Callable[[], None] | None = None
        self.closed = False  # the consumer is gone; producers stop at their next step

    # -- producer side, from a pool thread ----------------------------------------------

    def put_threadsafe(self, data: bytes) -> bool:
        """Buffer ``data`` from a thread; True means the buffer is full."""
        with self._lock:
            self._chunks.append(data)
            self._size += len(data)
            self._count += 1
            full = self._size >= self._limit
            notify = not self._notified
            self._notified = True
        if notify:
            self._loop.call_soon_threadsafe(self._wake_from_thread)
        return full

    def park(self, on_space: Callable[[], None]) -> bool:
        """Stop a thread producer while full; ``on_space`` runs (on the loop) once the
        consumer has taken the data. False means room appeared meanwhile: go on."""
        with self._lock:
            if self._size < self._limit or self.closed:
                return False
            self._parked = True
            self._on_space = on_space
            return True

    def finish_threadsafe(self, reason: EndReason) -> None:
        """The thread producer is done."""
        with self._lock:
            if self._end is _OPEN:
                self._end = reason
        self._loop.call_soon_threadsafe(self._wake)

    # -- consumer side, on the loop -----------------------------------------------------

    def take(self) -> tuple[bytes, int] | None:
        """Everything buffered as one chunk with its item count, or None if empty."""
        with self._lock:
            if not self._chunks:
                return None
            chunks = self._chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            count = self._count
            self._chunks = []
            self._size = self._count = 0
            resume, self._on_space = self._on_space if self._parked else None, None
            self._parked = False
        if resume is not None:
            resume()
        return data, count

    @property
    def ended(self) -> bool:
        """The producer said it is done (data may still be buffered)."""
        return self._end is not _OPEN

    @property
    def end_reason(self) -> EndReason:
        """Why the producer ended; only meaningful once :attr:`ended`."""
        return None if self._end is _OPEN else self._end  # type: ignore[return-value]

    async def wait(self) -> None:
        """Wait for data, an end, or :meth:`interrupt`."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def close(self) -> bool:
        """The consumer is gone. True if a thread producer is parked (nobody runs it)."""
        with self._lock:
            self.closed = True
            parked, self._parked, self._on_space = self._parked, False, None
        return parked

    def interrupt(self) -> None:
        """Wake the consumer now (it has something else to do, such as shut down)."""
        self._wake()

    # -- internals ----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_from_thread(self) -> None:
        with self._lock:
            self._notified = False
        self._wake()
