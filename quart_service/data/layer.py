"""The data layer as a part of the worker: migrations, the database handle, the refresh
plane, the models repository and the cache, and what ``/readyz`` and
``/debug/identity`` say about them."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

from ..config import Settings
from ..observability.metrics import Metrics
from ..part import Readiness
from ..singletons import Resource, ResourceRegistry
from .cache import ServiceCache
from .database import Database
from .migrations import SchemaStatus, apply_migrations, schema_status
from .models import ModelRepository
from .plane import DataPlane, Freshness, PlaneCounts
from .snapshot import Snapshot

__all__ = ["SNAPSHOT", "DataLayer"]

_log = logging.getLogger("quart_service.data")
T = TypeVar("T")

# The first snapshot, as a required resource: /readyz waits for it, and a failed
# first load is retried on the next use.
SNAPSHOT = "snapshot"


class DataLayer:
    """Built in ``create_app`` (opens nothing); started once per worker."""

    name = "data"

    def __init__(self, settings: Settings, registry: ResourceRegistry) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.migrations_applied = 0
        self.schema: SchemaStatus | None = None
        self._database: Database | None = None
        self._models: ModelRepository | None = None
        self._plane: DataPlane | None = None
        self._cache: ServiceCache | None = None
        self._task: asyncio.Task[None] | None = None
        self._clearing: set[asyncio.Task[None]] = set()
        registry.declare(Resource(SNAPSHOT, self._first_snapshot, required=True))

    # -- what views use -------------------------------------------------------------------

    @property
    def database(self) -> Database:
        """This worker's database handle (opened on its first query)."""
        return self._started(self._database)

    @property
    def plane(self) -> DataPlane:
        """This worker's part in the refresh: leader or follower, and its snapshot."""
        return self._started(self._plane)

    @property
    def cache(self) -> ServiceCache:
        """This worker's generation-scoped cache."""
        return self._started(self._cache)

    @property
    def models(self) -> ModelRepository:
        """The models table (the admin API's reads and writes)."""
        return self._started(self._models)

    @property
    def snapshot(self) -> Snapshot | None:
        """The snapshot this worker serves now (None before the first)."""
        return self.plane.snapshot

    def freshness(self) -> Freshness:
        """The leader's last word on the database (how stale the data may be)."""
        return self.plane.freshness()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, metrics: Metrics) -> None:
        """Migrate (one worker applies, the others wait), then start the refresh loop."""
        settings = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._database = Database(
            settings.database_file,
            settings.database_busy_timeout,
            metrics.counts(metrics.database_queries),
        )
        counts = PlaneCounts(
            metrics.count(metrics.refresh_runs),
            metrics.count(metrics.refresh_failures),
            metrics.count(metrics.leader_changes),
        )
        self._models = ModelRepository(self._database)
        plane = self._plane = DataPlane(
            self.data_dir, settings.refresh_interval, self._database, self._models, counts
        )
        self._cache = ServiceCache(
            settings.cache_ttl,
            lambda: plane.generation,
            lookups=metrics.counts(metrics.cache_requests),
            loads=metrics.counts(metrics.cache_loads),
        )
        metrics.on_sample(self._sample)
        loop = asyncio.get_running_loop()
        if settings.auto_migrate:
            applied = await loop.run_in_executor(
                None, apply_migrations, settings.database_file, settings.database_busy_timeout
            )
            self.migrations_applied = len(applied)
        await self.check_schema()
        plane.on_swap(self._drop_old_generations)
        self._task = loop.create_task(plane.run())

    async def stop(self) -> None:
        """Stop refreshing (the leader lock is released), close the cache and database."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._cache is not None:
            await self._cache.close()
        if self._database is not None:
            await self._database.close()

    async def check_schema(self) -> SchemaStatus:
        """Compare the database with the migration files (in the pool: it blocks)."""
        loop = asyncio.get_running_loop()
        self.schema = await loop.run_in_executor(
            None, schema_status, self.settings.database_file, self.settings.database_busy_timeout
        )
        return self.schema

    async def readiness(self) -> Readiness:
        """Schema current, snapshot loaded, data fresh enough."""
        if self.schema is None or self.schema.behind:
            await self.check_schema()  # migrated meanwhile? look again
        ready = Readiness()
        schema, plane = self.schema, self.plane
        if schema is None or schema.behind:
            current = schema.current if schema else "unknown"
            latest = schema.latest if schema else "unknown"
            ready.problems.append(
                f"database schema is at version {current}, migrations go to {latest}: "
                "run quart-service migrate"
            )
        if plane.snapshot is None:
            ready.problems.append("no snapshot loaded yet")
        freshness = plane.freshness()
        now = time.time()
        ready.checks.update(
            schema_version=schema.current if schema else None,
            generation=plane.generation,
            stale=freshness.failing_since is not None,
            stale_since=freshness.failing_since,
            last_refresh_age=None
            if freshness.checked_at is None
            else round(now - freshness.checked_at, 3),
        )
        limit = self.settings.snapshot_max_staleness
        if freshness.failing_since is not None:
            age = now - (freshness.checked_at or freshness.failing_since)
            if limit and age > limit:
                ready.problems.append(
                    f"data is stale: the database has failed since "
                    f"{time.strftime('%H:%M:%S', time.localtime(freshness.failing_since))} "
                    f"({freshness.error}); serving a snapshot {age:.0f} s old"
                )
        return ready

    def identity(self) -> dict[str, Any]:
        """This worker's part in the data plane."""
        plane = self.plane
        snapshot = plane.snapshot
        return {
            "role": plane.role,
            "generation": plane.generation,
            "revision": snapshot.revision if snapshot else None,
            "snapshot_age": None
            if snapshot is None
            else round(time.time() - snapshot.loaded_at, 3),
            "models": sorted(snapshot.models) if snapshot else [],
            "database": self.database.identity(),
            "queries": self.database.queries.as_dict(),
            "migrations_applied": self.migrations_applied,
            **plane.counts.as_dict(),
            "cache": self.cache.identity(),
        }

    # -- internals ------------------------------------------------------------------------

    async def _first_snapshot(self) -> Snapshot:
        return await self.plane.first_snapshot()

    def _sample(self, metrics: Metrics) -> None:
        plane = self.plane
        metrics.is_leader.set(1 if plane.role == "leader" else 0)
        metrics.snapshot_generation.set(plane.generation)

    def _drop_old_generations(self, _snapshot: Snapshot) -> None:
        # Old keys are already unreachable; clearing just frees their memory now.
        task = asyncio.get_running_loop().create_task(self.cache.clear())
        self._clearing.add(task)
        task.add_done_callback(self._clearing.discard)

    @staticmethod
    def _started(value: T | None) -> T:
        if value is None:
            raise RuntimeError(
                "the worker has not started: the data layer exists only while serving"
            )
        return value
