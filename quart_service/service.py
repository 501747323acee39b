"""The per-process service state, and the API that views use to reach it.

One :class:`Service` lives on ``app.extensions["quart_service"]``. It is built by
``create_app`` (cheap, opens nothing) and comes alive in the worker's startup hook,
where the thread pool and the resource registry are created for *this* process; at
shutdown they are closed in reverse order. Application and team code reach it
through :func:`current_service`, :func:`resources` and :func:`settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from quart import current_app, g

from ._drain import Drain
from ._logging import configure_logging
from ._proc import rss_bytes, thread_count
from .cache import ServiceCache
from .data.database import Database
from .data.layer import DATABASE, SNAPSHOT, DataLayer
from .data.snapshot import Snapshot
from .executor import BoundedExecutor
from .metrics import ServiceMetrics, enable_multiprocess, process_metrics
from .plugins import LoadedPlugins
from .resources import Resource, ResourceRegistry, ResourceState
from .settings import Settings
from .streaming.body import StreamCounters, StreamHub, StreamPolicy

__all__ = [
    "EXTENSION",
    "Service",
    "cache",
    "cached",
    "current_service",
    "database",
    "resources",
    "settings",
    "snapshot",
]

EXTENSION = "quart_service"
T = TypeVar("T")
log = logging.getLogger("quart_service")


class Service:
    """Everything this worker process owns: settings, pool, resources, counters."""

    def __init__(self, settings: Settings, specs: Sequence[Resource[Any]] = ()) -> None:
        self.settings = settings
        self.specs = tuple(specs)
        self.stream_policy = StreamPolicy(
            idle_timeout=settings.stream_idle_timeout,
            total_timeout=settings.stream_total_timeout,
            heartbeat=settings.stream_heartbeat,
            buffer_bytes=settings.stream_buffer_bytes,
        )
        self.stream_hub = StreamHub(settings.stream_reconnect_after)
        self.data = DataLayer(settings)
        self.plugins = LoadedPlugins()
        self.started_at: float | None = None
        self.stopping = False
        self.metrics: ServiceMetrics | None = None
        self.requests_in_progress = 0  # kept by the request observer
        self.drain = Drain(
            settings.stream_drain_timeout,
            self.stream_hub,
            lambda: self.stopping,
            self.stop,
        )
        self._executor: BoundedExecutor | None = None
        self._resources: ResourceRegistry | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- what views use -----------------------------------------------------------------

    @property
    def executor(self) -> BoundedExecutor:
        """This process's one thread pool (exists once the server has started)."""
        if self._executor is None:
            raise RuntimeError(_NOT_STARTED)
        return self._executor

    @property
    def resources(self) -> ResourceRegistry:
        """This process's singletons (exists once the server has started)."""
        if self._resources is None:
            raise RuntimeError(_NOT_STARTED)
        return self._resources

    @property
    def role(self) -> str:
        """``leader`` (refreshes the data for every worker of the host) or ``follower``."""
        return self.data.plane.role

    @property
    def streams(self) -> StreamCounters:
        """This process's stream counts."""
        return self.stream_hub.counters

    @property
    def draining(self) -> bool:
        """Whether this worker is draining (SIGTERM): finishing, not taking new work."""
        return self.drain.draining

    @property
    def serving(self) -> bool:
        """Whether the startup hook has run in this process."""
        return self._resources is not None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create this process's pool and registry; runs once per worker at startup."""
        settings = self.settings
        configure_logging(settings.log_level, settings.log_format)
        if settings.metrics:
            # Before the first metric exists: its values must live in the shared files.
            enable_multiprocess(settings.metrics_root)
        self.metrics = process_metrics()
        loop = asyncio.get_running_loop()
        self._executor = BoundedExecutor(
            settings.executor_threads, settings.executor_queue, retry_after=settings.retry_after
        )
        # Quart's sync views and run_sync call run_in_executor(None, ...): this is it.
        loop.set_default_executor(self._executor)
        self._resources = ResourceRegistry(
            [*self.data.resources(), *self.specs], max_waiting=settings.executor_queue
        )
        await self.data.start(self._resources)
        self.started_at = time.time()
        await self._resources.warm(only_marked=not settings.warm_resources)
        self.drain.install()
        self.sample_metrics()
        self._spawn(self._sample_every(_SAMPLE_INTERVAL))
        # Readiness depends on required resources: start them now, without holding
        # up start-up, so /readyz turns green without waiting for a first request.
        self.ensure_required()
        log.info(
            "worker %d serving: %d pool threads, %d resources declared",
            os.getpid(),
            settings.executor_threads,
            len(self.specs),
        )

    async def stop(self) -> None:
        """Close resources in reverse creation order, then the pool (once)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("worker %d stopping", os.getpid())
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.data.stop()
        if self._resources is not None:
            await self._resources.aclose()
        if self._executor is not None:
            # Running jobs finish on their own; queued ones are dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)

    def sample_metrics(self) -> None:
        """Set this worker's gauges: pool load, threads, memory, role, snapshot,
        resource states (every second, and before a scrape)."""
        metrics = self.metrics
        if metrics is None or self._executor is None or self._resources is None:
            return
        stats = self._executor.stats()
        metrics.in_progress.set(self.requests_in_progress)
        metrics.executor_threads.set(stats.max_threads)
        metrics.executor_busy.set(stats.active)
        metrics.executor_queued.set(stats.queued)
        metrics.worker_threads.set(thread_count())
        metrics.worker_memory.set(rss_bytes())
        metrics.is_leader.set(1 if self.role == "leader" else 0)
        metrics.snapshot_generation.set(self.data.plane.generation)
        for status in self._resources.status():
            for state in ResourceState:
                value = 1 if status.state is state else 0
                metrics.resource_state.labels(status.name, state.value).set(value)

    async def _sample_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sample_metrics()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def ensure_required(self) -> None:
        """Start creating each required resource that is not ready, in the background."""
        registry = self.resources
        for status in registry.status():
            if status.required and status.state in (
                ResourceState.NOT_CREATED,
                ResourceState.FAILED,
            ):
                self._spawn(self._create(status.name))

    async def _create(self, name: str) -> None:
        # The registry logged a failure and records the state; retried on next use.
        with contextlib.suppress(Exception):
            await self.resources.get(name)


_SAMPLE_INTERVAL = 1.0
_NOT_STARTED = (
    "the service has not started in this process: resources and the pool exist only "
    "while serving (inside requests, or between before_serving and after_serving)"
)


def current_service() -> Service:
    """The :class:`Service` of the app handling the current request."""
    service: Service = current_app.extensions[EXTENSION]
    return service


def resources() -> ResourceRegistry:
    """This process's resource registry: ``await resources().get(MY_RESOURCE)``."""
    return current_service().resources


def settings() -> Settings:
    """The service's settings."""
    return current_service().settings


def cache() -> ServiceCache:
    """This process's cache: ``await cache().get_or_load(key, loader)``."""
    return current_service().data.cache


async def snapshot() -> Snapshot:
    """The data snapshot for this request: the same object from start to end of it."""
    held: Snapshot | None = g.get(_SNAPSHOT_KEY)
    if held is None:
        await current_service().resources.get(SNAPSHOT)  # loads it on first use
        held = current_service().data.plane.snapshot
        assert held is not None
        setattr(g, _SNAPSHOT_KEY, held)
    return held


async def cached(key: str, loader: Callable[[], Awaitable[T]], ttl: float | None = None) -> T:
    """``cache().get_or_load`` scoped to this request's snapshot generation."""
    current = await snapshot()
    return await cache().get_or_load(key, loader, ttl, generation=current.generation)


async def database() -> Database:
    """This process's database connection (opened on first use)."""
    db: Database = await current_service().resources.get(DATABASE)
    return db


_SNAPSHOT_KEY = "_quart_service_snapshot"
