"""Concurrent calls into one singleton, grouped into one job on the shared pool.

``await batcher.call(item)`` puts ``item`` in the pending batch. The batch leaves as
one job ``fn(items)``, run through ``run`` (the worker's shared pool), as soon as it
holds ``max_batch`` items, or ``max_wait`` seconds after its oldest item arrived,
whichever comes first; each caller gets its own result back.

Jobs in flight: at most ``max_jobs`` (default 1). While a job runs, the next batch
fills, so the batch size adapts to the load by itself (the longer a job takes, the
more calls it groups next); a second job at the same time would only split the same
calls into smaller batches and compete for the same cores (the native thread budget
is per worker, not per job). Raise it only for a ``fn`` that releases the GIL and
cannot use the worker's cores on its own (an inference session with one intra-op
thread).

What the service's users reported from other batchers, and what this one does:

- A caller that leaves (cancelled: the client went away, a timeout) before its job
  starts is taken out of the batch; one that leaves later has its result dropped. A
  job whose callers all left before it reached a thread does not run ``fn`` at all.
  Ray Serve's ``@serve.batch`` could hang for good when batched requests were
  cancelled (ray-project/ray#50046, fixed by dropping cancelled requests before a
  batch runs, #50054), and once stopped its batching loop by setting a result on a
  cancelled caller's future (#41057).
- An exception from ``fn`` (or from ``run``, or a wrong number of results) fails
  every caller of that batch with it, and the next batch runs as usual: no error
  escapes the code that completes the callers (ray-project/ray#66140: an exception in
  a sizing callback ended the batching task and every later request hung).
- The items are plain values taken when ``call`` is made: ``fn`` never awaits anything
  a caller owns, so a caller that leaves cannot leave ``fn`` waiting.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Batcher", "BatcherStats"]

I = TypeVar("I")  # noqa: E741 - the interface's name for an item
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """A :class:`Batcher`'s counters since it was made, and its load now."""

    jobs: int  # jobs that ran fn (failed ones included)
    items: int  # items those jobs carried
    mean_batch: float  # items per job
    largest_batch: int
    failed_jobs: int  # jobs whose callers got an exception
    skipped_jobs: int  # jobs not run: every caller had left before a thread took it
    cancelled: int  # callers that left before their result
    pending: int  # calls waiting for a job now
    in_flight: int  # jobs submitted and not finished now


class _Call(Generic[I, R]):
    """One caller: its item, where its result goes, and whether it is still there."""

    __slots__ = ("arrived", "future", "gone", "item", "taken")

    def __init__(self, item: I, future: asyncio.Future[R], arrived: float) -> None:
        self.item = item
        self.future = future
        self.arrived = arrived
        self.taken = False  # in a job (no longer pending)
        # The caller left. Set on the event loop, read by the job on its thread: a
        # bool read is atomic, and a stale read only costs computing one result.
        self.gone = False


class Batcher(Generic[I, R]):
    """Groups concurrent ``call(item)`` into ``fn(items)`` jobs run through ``run``.

    ``fn`` takes a sequence of items and returns one result per item, in order. ``run``
    is how a job reaches the worker's pool, called as ``run(job, batch)``: for an
    engine, ``EngineContext.run_sync``. The batcher belongs to one event loop (the
    worker's); make it where the singleton that owns it is made.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[I]], Sequence[R]],
        run: Callable[..., Awaitable[Any]],
        *,
        max_batch: int,
        max_wait: float,
        max_jobs: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be 0 or more seconds, got {max_wait}")
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs}")
        self._fn = fn
        self._run = run
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._max_jobs = max_jobs
        self._pending: deque[_Call[I, R]] = deque()
        self._in_flight = 0
        self._jobs: set[asyncio.Task[None]] = set()  # strong references, as asyncio asks
        # The next look at the pending batch: a timer (or, for a time already past, a
        # plain callback: uvloop's call_at gives a Handle then) and when it is due.
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0
        self._jobs_run = self._items = self._largest = 0
        self._failed = self._skipped = self._cancelled = 0

    async def call(self, item: I) -> R:
        """``item``'s result from a job shared with the calls made at about the same time.

        Raises what the job raised. Cancelling the caller takes the item out of its
        batch if the job has not started, and drops its result if it has."""
        loop = asyncio.get_running_loop()
        entry: _Call[I, R] = _Call(item, loop.create_future(), loop.time())
        self._pending.append(entry)
        try:
            # A batch that is not full does not leave from here, even when max_wait is 0:
            # it leaves from a timer, after the calls made in this same turn of the event
            # loop (callers woken together by the last job's results) have joined it.
            self._dispatch(loop, loop.time(), hold=True)
            return await entry.future
        except BaseException as exc:
            entry.gone = True
            if isinstance(exc, asyncio.CancelledError):
                self._cancelled += 1
            if not entry.taken:
                self._pending.remove(entry)
                if not self._pending:
                    self._disarm()
            raise

    def stats(self) -> BatcherStats:
        """The counters, for ``/debug/identity`` and the benchmarks."""
        return BatcherStats(
            jobs=self._jobs_run,
            items=self._items,
            mean_batch=self._items / self._jobs_run if self._jobs_run else 0.0,
            largest_batch=self._largest,
            failed_jobs=self._failed,
            skipped_jobs=self._skipped,
            cancelled=self._cancelled,
            pending=len(self._pending),
            in_flight=self._in_flight,
        )

    # -- internals --------------------------------------------------------------------

    def _dispatch(self, loop: asyncio.AbstractEventLoop, now: float, *, hold: bool = False) -> None:
        """Start every batch that is due (full, or its oldest item waited max_wait) while
        a job slot is free; otherwise make sure a timer looks again when one is due.
        With ``hold``, only full batches leave now."""
        pending = self._pending
        while pending and self._in_flight < self._max_jobs:
            if len(pending) < self._max_batch:
                due = pending[0].arrived + self._max_wait
                if hold or now < due:
                    self._arm(loop, due)
                    return
            size = min(len(pending), self._max_batch)
            batch = [pending.popleft() for _ in range(size)]
            for entry in batch:
                entry.taken = True
            self._in_flight += 1
            # A fresh context: the job outlives the request whose call started it, and
            # must not keep that request's context (and what it references) alive.
            task = loop.create_task(self._job(batch), context=contextvars.Context())
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)
        if not pending:
            self._disarm()

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= due:
                return  # an earlier look is already planned; it plans the next one
            timer.cancel()
        self._timer_at = due
        self._timer = loop.call_at(due, self._on_timer, loop, due, context=contextvars.Context())

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        self._timer = None
        # The loop may run a timer a clock tick early: the batch it was armed for is due.
        self._dispatch(loop, max(loop.time(), due))

    async def _job(self, batch: list[_Call[I, R]]) -> None:
        cancelled = False
        try:
            live, results = await self._run(self._work, batch)
            if results is None:
                self._skipped += 1
                return
            self._jobs_run += 1
            self._items += len(live)
            self._largest = max(self._largest, len(live))
            if len(results) != len(live):
                raise ValueError(
                    f"the batch function returned {len(results)} results for "
                    f"{len(live)} items: it must return one result per item, in order"
                )
        except asyncio.CancelledError:
            cancelled = True  # the loop is shutting down: answer the callers, then stop
            self._fail(batch, RuntimeError("the batch job was cancelled before it finished"))
            raise
        except Exception as exc:
            self._failed += 1
            self._fail(batch, exc)
        else:
            for entry, result in zip(live, results, strict=True):
                if not entry.future.done():  # a caller that left has a cancelled future
                    entry.future.set_result(result)
        finally:
            self._in_flight -= 1
            if not cancelled:
                loop = asyncio.get_running_loop()
                self._dispatch(loop, loop.time())

    def _work(self, batch: list[_Call[I, R]]) -> tuple[list[_Call[I, R]], Sequence[R] | None]:
        """The job, on a pool thread: ``fn`` on the items whose callers are still there."""
        live = [entry for entry in batch if not entry.gone]
        if not live:
            return live, None
        try:
            return live, self._fn([entry.item for entry in live])
        except StopIteration as exc:
            # A future cannot hold StopIteration: the pool's hand-over to the event loop
            # would fail and the job would never finish.
            raise RuntimeError("the batch function raised StopIteration") from exc

    @staticmethod
    def _fail(batch: list[_Call[I, R]], error: BaseException) -> None:
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(error)
