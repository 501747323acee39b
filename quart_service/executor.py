"""One bounded thread pool per worker process.

asyncio's default executor has min(32, cores + 4) threads and an unbounded queue, so
a burst of blocking work waits without limit (``concurrent.futures.thread`` queues
work in an unbounded ``SimpleQueue``; https://github.com/python/cpython/issues/73781
asks for a bound). This pool is
installed as the loop's default executor at start-up, so Quart's sync views,
``run_sync``, stream bridges and ``loop.run_in_executor(None, ...)`` all share it, and
no resource starts a pool of its own.

Admission is bounded: at most ``threads + queue`` jobs may be outstanding. A job
beyond that is refused at once with :class:`~quart_service.errors.Overloaded`, which
the error handler turns into 503 + Retry-After. Work already admitted (the next step
of a running stream) may be submitted with :meth:`BoundedExecutor.submit_admitted`,
which is never refused, so a stream is not cut half-way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ParamSpec, TypeVar

from .config import Settings
from .errors import Overloaded
from .native_threads import server_workers
from .observability.metrics import Count, Metrics
from .part import Readiness
from .sizing import for_this_host

__all__ = ["THREAD_NAME_PREFIX", "BoundedExecutor", "ExecutorStats", "Pool"]

P = ParamSpec("P")
T = TypeVar("T")

THREAD_NAME_PREFIX = "quart-service-pool"
_log = logging.getLogger("quart_service")


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """A snapshot of the pool's load."""

    threads: int  # threads started so far (grows lazily up to max_threads)
    max_threads: int
    active: int  # jobs running on a thread now
    queued: int  # jobs admitted and waiting for a thread
    queue_limit: int
    rejected: int  # jobs refused since start


class BoundedExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose queue is bounded and whose load is observable."""

    def __init__(
        self, threads: int, queue: int, *, retry_after: float = 1.0, shed: Count | None = None
    ) -> None:
        super().__init__(max_workers=threads, thread_name_prefix=THREAD_NAME_PREFIX)
        self._shed = shed if shed is not None else Count()
        self._capacity = threads + queue
        self._queue_limit = queue
        self._retry_after = retry_after
        self._lock = threading.Lock()
        self._outstanding = 0  # admitted and not yet finished (or cancelled)
        self._active = 0
        self._rejected = 0

    @property
    def max_threads(self) -> int:
        """The pool's size."""
        return self._max_workers

    def has_capacity(self) -> bool:
        """Whether a new job would be admitted now."""
        return self._outstanding < self._capacity

    def check_capacity(self) -> None:
        """Raise :class:`Overloaded` if a new job would be refused now."""
        if self._outstanding >= self._capacity:
            with self._lock:
                self._rejected += 1
            raise self._overloaded()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queue ``fn``, or raise :class:`Overloaded` when the pool and its queue are full."""
        with self._lock:
            if self._outstanding >= self._capacity:
                self._rejected += 1
                raise self._overloaded()
            self._outstanding += 1
        return self._submit(fn, args, kwargs)

    def submit_admitted(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """Queue the next step of work that was already admitted; never refused."""
        with self._lock:
            self._outstanding += 1
        return self._submit(fn, args, {})

    def stats(self) -> ExecutorStats:
        """The pool's current load."""
        with self._lock:
            active, outstanding, rejected = self._active, self._outstanding, self._rejected
        return ExecutorStats(
            threads=len(self._threads),
            max_threads=self._max_workers,
            active=active,
            queued=max(0, outstanding - active),
            queue_limit=self._queue_limit,
            rejected=rejected,
        )

    # -- internals --------------------------------------------------------------------

    def _submit(self, fn: Callable[..., T], args: Any, kwargs: Any) -> Future[T]:
        try:
            future: Future[T] = super().submit(self._run, fn, args, kwargs)
        except BaseException:
            self._release()
            raise
        # A done callback fires for completion *and* cancellation, so a job cancelled
        # before it ever ran still gives its place back.
        future.add_done_callback(self._on_done)
        return future

    def _run(self, fn: Callable[..., T], args: Any, kwargs: Any) -> T:
        with self._lock:
            self._active += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._active -= 1

    def _on_done(self, _future: Future[Any]) -> None:
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._outstanding -= 1

    def _overloaded(self) -> Overloaded:
        self._shed.inc()
        return Overloaded(
            f"The worker's thread pool is full ({self._max_workers} threads busy, "
            f"{self._queue_limit} jobs queued); retry after {self._retry_after:g} s.",
            retry_after=self._retry_after,
        )


class Pool:
    """The pool as a part of the worker: created at start-up, shut down at the end."""

    name = "executor"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._executor: BoundedExecutor | None = None

    @property
    def executor(self) -> BoundedExecutor:
        """This process's pool (exists while the worker serves)."""
        if self._executor is None:
            raise RuntimeError(
                "the worker has not started: the pool exists only while serving "
                "(inside requests, or between before_serving and after_serving)"
            )
        return self._executor

    async def start(self, metrics: Metrics) -> None:
        """Create the pool and make it the loop's default executor."""
        settings = self._settings
        # executor_threads = 0: the rule's size for this host and workload (sizing.py).
        sizing = for_this_host(
            settings.workload, workers=server_workers(), threads=settings.executor_threads
        )
        _log.info(
            "worker %d: pool of %d threads (%s)", os.getpid(), sizing.threads, sizing.threads_reason
        )
        self._executor = BoundedExecutor(
            sizing.threads,
            settings.executor_queue,
            retry_after=settings.retry_after,
            shed=metrics.count(metrics.shed, "executor_full"),
        )
        # Quart's sync views and run_sync call run_in_executor(None, ...): this is it.
        asyncio.get_running_loop().set_default_executor(self._executor)
        metrics.on_sample(self._sample)

    async def stop(self) -> None:
        """Running jobs finish on their own; queued ones are dropped."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def readiness(self) -> Readiness:
        """A full pool sheds requests; it does not make the worker unready."""
        return Readiness()

    def identity(self) -> dict[str, Any]:
        """The pool's load."""
        return asdict(self.executor.stats())

    def _sample(self, metrics: Metrics) -> None:
        stats = self.executor.stats()
        metrics.executor_threads.set(stats.max_threads)
        metrics.executor_busy.set(stats.active)
        metrics.executor_queued.set(stats.queued)
