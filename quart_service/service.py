"""The process container: a worker's parts, started in order and stopped in reverse.

One :class:`Service` is built by ``create_app`` (cheap, opens nothing). In each worker
process, Quart's ``before_serving`` runs :meth:`Service.start`: logging and the
metric files are set up, then every part starts with the worker's one
:class:`~quart_service.observability.metrics.Metrics`. ``after_serving`` runs
:meth:`Service.stop`, which stops the parts in reverse order. The container does
nothing else: each part answers for itself on ``/readyz`` and ``/debug/identity``,
and views reach parts through :mod:`quart_service.context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import time
from collections.abc import Sequence
from typing import Any

from quart import Quart

from .config import Settings
from .context import SETTINGS_KEY
from .data.layer import SNAPSHOT
from .data.snapshot import Snapshot
from .drain import Drain
from .executor import Pool
from .native_threads import NativeBudget
from .observability.logs import configure_logging
from .observability.metrics import Metrics, enable_multiprocess
from .observability.observer import RequestObserver
from .observability.proc import rss_bytes, thread_count
from .part import METRICS_KEY, PARTS_KEY, Part, Readiness, extension_key
from .singletons import ResourceRegistry
from .streaming.body import StreamHub

__all__ = ["Service"]

_log = logging.getLogger("quart_service")

_SAMPLE_INTERVAL = 1.0
# Request tallies reach the shared metric files this often (what a SIGKILL can lose).
_FLUSH_INTERVAL = 0.25


class Service:
    """Everything one worker process owns, as parts with one lifecycle."""

    def __init__(
        self,
        settings: Settings,
        parts: Sequence[Part],
        streams: StreamHub,
        observer: RequestObserver | None = None,
        *,
        native: NativeBudget | None = None,
        sources: Sequence[str] = (),
        mounts: Sequence[str] = (),
    ) -> None:
        """``sources``: where the settings came from; ``mounts``: the mounted WSGI
        apps (``/prefix=module:attribute``); both for the start-up log."""
        self.settings = settings
        self.sources = list(sources)
        self.mounts = list(mounts)
        self._blueprints: list[str] = []
        self._models_logged: asyncio.Task[None] | None = None
        self.drain = Drain(settings.stream_drain_timeout, streams, self._is_stopping, self.stop)
        self.worker = _Worker(native)
        self.parts: tuple[Part, ...] = (self.worker, *parts, self.drain)
        self.worker.parts = [part.name for part in self.parts]
        self.observer = observer
        self.metrics: Metrics | None = None
        self._started: list[Part] = []
        self._stopping = False
        self._sampler: asyncio.Task[None] | None = None
        self._extensions: dict[str, Any] = {}

    def install(self, app: Quart) -> None:
        """Put the settings and every part on ``app.extensions``; hook the lifecycle."""
        self._extensions = app.extensions
        self._blueprints = _blueprints(app)
        app.extensions[SETTINGS_KEY] = self.settings
        app.extensions[PARTS_KEY] = self.parts
        for part in self.parts:
            app.extensions[extension_key(part.name)] = part
        app.before_serving(self.start)
        app.after_serving(self.stop)

    async def start(self) -> None:
        """Start every part, in order; runs once per worker at start-up."""
        settings = self.settings
        configure_logging(settings.log_level, settings.log_format)
        if settings.metrics:
            # Before the first metric exists: its values must live in the shared files.
            enable_multiprocess(settings.metrics_root)
        metrics = self.metrics = self._extensions[METRICS_KEY] = Metrics()
        if self.observer is not None:
            self.observer.bind(metrics)
        for part in self.parts:
            await part.start(metrics)
            self._started.append(part)
        metrics.sample()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_every())
        if self.worker.native is not None:
            _log.info(
                "worker %d: native thread budget %s", os.getpid(), self.worker.native.describe()
            )
        _log.info("worker %d serving: %s", os.getpid(), self._summary())
        _log.info("worker %d configuration: %s", os.getpid(), self._configuration())
        registry = self._registry()
        if registry is not None and SNAPSHOT in registry:
            self._models_logged = asyncio.get_running_loop().create_task(self._log_models(registry))

    async def stop(self) -> None:
        """Stop the started parts in reverse order (once)."""
        if self._stopping:
            return
        self._stopping = True
        _log.info("worker %d stopping", os.getpid())
        for task in (self._sampler, self._models_logged):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while self._started:
            part = self._started.pop()
            try:
                await part.stop()
            except Exception:
                _log.exception("stopping %s failed", part.name)
        if self.metrics is not None:
            self.metrics.flush()  # the requests answered since the last tick
        if self.observer is not None and self.observer.access_log is not None:
            self.observer.access_log.flush()

    def _is_stopping(self) -> bool:
        return self._stopping

    async def _sample_every(self) -> None:
        assert self.metrics is not None
        flushes = round(_SAMPLE_INTERVAL / _FLUSH_INTERVAL)
        while True:
            for _ in range(flushes - 1):
                await asyncio.sleep(_FLUSH_INTERVAL)
                self.metrics.flush()
            await asyncio.sleep(_FLUSH_INTERVAL)
            self.metrics.sample()

    def _registry(self) -> ResourceRegistry | None:
        return next((p for p in self.parts if isinstance(p, ResourceRegistry)), None)

    def _summary(self) -> str:
        registry = self._registry()
        names = registry.names() if registry is not None else []
        pool = next((p for p in self.parts if isinstance(p, Pool)), None)
        threads = pool.executor.stats().max_threads if pool is not None else 0
        return (
            f"{threads} pool threads, "
            f"parts: {', '.join(part.name for part in self.parts)}; "
            f"{len(names)} resources: {', '.join(names) or 'none'}"
        )

    def _configuration(self) -> str:
        """Where the settings came from, where the data lives, what is mounted."""
        settings = self.settings
        database = (
            "PostgreSQL (database_url)"
            if settings.database_url
            else str(settings.database_file.resolve())
        )
        parts = [
            f"settings from {'; '.join(self.sources) or 'create_app()'}",
            f"database {database}",
            f"blueprints {', '.join(self._blueprints) or 'none'}",
        ]
        if self.mounts:
            parts.append(f"WSGI mounts {', '.join(self.mounts)}")
        return "; ".join(parts)

    async def _log_models(self, registry: ResourceRegistry) -> None:
        # Once the first snapshot is loaded (in the background: start-up does not
        # wait for the database); a failure is logged by the registry itself.
        try:
            snapshot: Snapshot = await registry.get(SNAPSHOT)
            models = snapshot.models
        except Exception:
            return
        listed = ", ".join(
            f"{name} ({config.engine}{'' if config.enabled else ', disabled'})"
            for name, config in sorted(models.items())
        )
        _log.info("worker %d models: %s", os.getpid(), listed or "none")


def _blueprints(app: Quart) -> list[str]:
    """Each registered blueprint with the common prefix of its routes."""
    found = []
    for name in app.blueprints:
        rules = [r.rule for r in app.url_map.iter_rules() if r.endpoint.startswith(name + ".")]
        found.append(f"{name} at {posixpath.commonpath(rules) if rules else '-'}")
    return found


class _Worker:
    """The worker process itself, as a part: when it started, which parts it has, its
    native thread budget."""

    name = "worker"

    def __init__(self, native: NativeBudget | None = None) -> None:
        self.started_at: float | None = None
        self.parts: list[str] = []
        self.native = native

    async def start(self, metrics: Metrics) -> None:
        self.started_at = time.time()
        metrics.on_sample(_sample_process)

    async def stop(self) -> None:
        return None

    async def readiness(self) -> Readiness:
        return Readiness()

    def identity(self) -> dict[str, Any]:
        started = self.started_at or time.time()
        return {
            "started_at": self.started_at,
            "uptime": round(time.time() - started, 3),
            "parts": self.parts,
            "native_threads": self.native.as_dict() if self.native is not None else None,
        }


def _sample_process(metrics: Metrics) -> None:
    metrics.worker_threads.set(thread_count())
    metrics.worker_memory.set(rss_bytes())
