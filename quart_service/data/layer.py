"""The data layer of one worker: migrations, the database resource, the data plane,
the cache, and what readiness and identity say about them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..cache import ServiceCache
from ..metrics.families import ExportedCounts, ServiceMetrics
from ..resources import Resource, ResourceRegistry
from ..settings import Settings
from .database import Database
from .migrations import SchemaStatus, apply_migrations, schema_status
from .plane import DataPlane
from .snapshot import Snapshot

__all__ = ["DATABASE", "SNAPSHOT", "DataLayer"]

log = logging.getLogger("quart_service.data")

DATABASE = "database"
SNAPSHOT = "snapshot"


class DataLayer:
    """Built with the service (opens nothing); started once per worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.database_file = settings.database_file
        self.queries: Counter[str] = ExportedCounts(_export_query)
        self.migrations_applied = 0
        self.schema: SchemaStatus | None = None
        self._registry: ResourceRegistry | None = None
        self.plane = DataPlane(
            self.data_dir, settings.refresh_interval, self._database, self._reset_database
        )
        self.cache = ServiceCache(settings.cache_ttl, lambda: self.plane.generation)
        self._task: asyncio.Task[None] | None = None
        self._clearing: set[asyncio.Task[None]] = set()

    def resources(self) -> list[Resource[Any]]:
        """The layer's resources, declared in every worker's registry."""
        return [
            Resource(DATABASE, self._open_database, close=Database.close),
            Resource(SNAPSHOT, self.plane.first_snapshot, required=True),
        ]

    async def start(self, registry: ResourceRegistry) -> None:
        """Migrate (one worker applies, the others wait), then start the refresh loop."""
        self._registry = registry
        self.data_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        if self.settings.auto_migrate:
            applied = await loop.run_in_executor(
                None, apply_migrations, self.database_file, self.settings.database_busy_timeout
            )
            self.migrations_applied = len(applied)
        await self.check_schema()
        self.plane.on_swap(self._drop_old_generations)
        self._task = loop.create_task(self.plane.run())

    async def stop(self) -> None:
        """Stop refreshing (the leader lock is released) and close the cache."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.cache.close()

    async def check_schema(self) -> SchemaStatus:
        """Compare the database with the migration files (in the pool: it blocks)."""
        loop = asyncio.get_running_loop()
        self.schema = await loop.run_in_executor(
            None, schema_status, self.database_file, self.settings.database_busy_timeout
        )
        return self.schema

    def readiness(self) -> tuple[dict[str, Any], list[str]]:
        """Checks for /readyz: schema current, snapshot loaded, data fresh enough."""
        problems: list[str] = []
        schema = self.schema
        if schema is None or schema.behind:
            current = schema.current if schema else "unknown"
            latest = schema.latest if schema else "unknown"
            problems.append(
                f"database schema is at version {current}, migrations go to {latest}: "
                "run quart-service migrate"
            )
        if self.plane.snapshot is None:
            problems.append("no snapshot loaded yet")
        freshness = self.plane.freshness()
        now = time.time()
        checks: dict[str, Any] = {
            "schema_version": schema.current if schema else None,
            "generation": self.plane.generation,
            "stale": freshness.failing_since is not None,
            "stale_since": freshness.failing_since,
            "last_refresh_age": None
            if freshness.checked_at is None
            else round(now - freshness.checked_at, 3),
        }
        limit = self.settings.snapshot_max_staleness
        if freshness.failing_since is not None:
            age = now - (freshness.checked_at or freshness.failing_since)
            if limit and age > limit:
                problems.append(
                    f"data is stale: the database has failed since "
                    f"{time.strftime('%H:%M:%S', time.localtime(freshness.failing_since))} "
                    f"({freshness.error}); serving a snapshot {age:.0f} s old"
                )
        return checks, problems

    def identity(self) -> dict[str, Any]:
        """This worker's part in the data plane, for /debug/identity."""
        snapshot = self.plane.snapshot
        return {
            "role": self.plane.role,
            "generation": self.plane.generation,
            "revision": snapshot.revision if snapshot else None,
            "snapshot_age": None
            if snapshot is None
            else round(time.time() - snapshot.loaded_at, 3),
            "models": sorted(snapshot.models) if snapshot else [],
            "queries": dict(self.queries),
            "migrations_applied": self.migrations_applied,
            **dict(self.plane.counters),
            "cache": dict(self.cache.counters),
        }

    async def _open_database(self) -> Database:
        return await Database.open(
            self.database_file, self.settings.database_busy_timeout, self.queries
        )

    async def _database(self) -> Database:
        assert self._registry is not None
        database: Database = await self._registry.get(DATABASE)
        return database

    async def _reset_database(self) -> None:
        if self._registry is not None:
            await self._registry.reset(DATABASE)

    def _drop_old_generations(self, _snapshot: Snapshot) -> None:
        # Old keys are already unreachable; clearing just frees their memory now.
        task = asyncio.get_running_loop().create_task(self.cache.clear())
        self._clearing.add(task)
        task.add_done_callback(self._clearing.discard)


def _export_query(metrics: ServiceMetrics, kind: str) -> Any:
    return metrics.database_queries.labels(kind)
