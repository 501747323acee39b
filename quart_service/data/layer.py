"""The data layer as a part of the worker: migrations, the database handle, the
datasets and their refresh, the cache, and what ``/readyz`` and ``/debug/identity``
say about them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Settings
from ..errors import MigrationError
from ..observability.metrics import Counts, Metrics
from ..part import Readiness
from ..singletons import Resource, ResourceRegistry
from .cache import CacheBackend, ServiceCache
from .database import Database
from .datasets import Dataset
from .markers import watch_tables
from .migrations import (
    SERVICE,
    MigrationSource,
    SchemaStatus,
    apply_migrations,
    schema_status,
)
from .models import MODELS, ModelRepository
from .plane import DataPlane, Freshness, PlaneCounts
from .snapshot import Snapshot
from .sqlite import SQLiteDatabase

if TYPE_CHECKING:
    from .cluster import ClusterFeed, Poll

__all__ = ["SNAPSHOT", "DataLayer", "open_database"]

_log = logging.getLogger("quart_service.data")
T = TypeVar("T")

# The first snapshot, as a required resource: /readyz waits for it, and a failed
# first load is retried on the next use.
SNAPSHOT = "snapshot"


def open_database(settings: Settings, queries: Counts | None = None) -> Database:
    """The backend the settings name (the one place that builds one): PostgreSQL
    through an asyncpg pool when ``database_url`` is set, else the SQLite file. Opens
    nothing: the first query does."""
    if settings.database_url:
        # Imported only here: a SQLite deployment needs no asyncpg.
        from .postgres import PostgresDatabase

        return PostgresDatabase(
            settings.database_url,
            settings.database_busy_timeout,
            settings.database_pool_size,
            queries,
        )
    return SQLiteDatabase(settings.database_file, settings.database_busy_timeout, queries)


class DataLayer:
    """Built in ``create_app`` (opens nothing); started once per worker."""

    name = "data"

    def __init__(
        self,
        settings: Settings,
        registry: ResourceRegistry,
        datasets: Sequence[Dataset[Any]] = (),
        *,
        migrations: Sequence[MigrationSource] = (),
        dataset_owners: dict[str, str] | None = None,
        on_source_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        """``migrations``: the teams' sources, applied after the service's, in order.
        ``on_source_failure(source, error)``: a team's migrations failed; without it a
        failure stops the start. ``dataset_owners``: dataset name to source name, so a
        failed team's datasets are not loaded."""
        self.settings = settings
        self.sources = [SERVICE, *migrations]
        self._owners = dict(dataset_owners or {})
        self._on_source_failure = on_source_failure
        self.data_dir = Path(settings.data_dir)
        self.datasets: dict[str, Dataset[Any]] = {}
        for dataset in [MODELS, *datasets]:
            self.declare(dataset)
        self.migrations_applied = 0
        self.schema: SchemaStatus | None = None
        self.unwatched: dict[str, str] = {}  # table -> why it has no revision marker
        self.failed_sources: dict[str, str] = {}  # team migrations that failed
        self._registry = registry
        self._database: Database | None = None
        self._models: ModelRepository | None = None
        self._plane: DataPlane | None = None
        self._cache: ServiceCache | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis: Any = None  # the Redis client, with coordination_url
        self._retiring: set[asyncio.Task[int]] = set()
        registry.declare(Resource(SNAPSHOT, self._first_snapshot, required=True))

    def declare(self, dataset: Dataset[Any]) -> Dataset[Any]:
        """Add a dataset (before the worker starts); a second one of a name is refused."""
        if dataset.name in self.datasets:
            raise ValueError(f"dataset {dataset.name!r} is declared twice")
        self.datasets[dataset.name] = dataset
        return dataset

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
        """This worker's scoped cache."""
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

    async def models_served(self) -> bool:
        """After a write to the models table: ask the leader to refresh now and wait
        until every worker of this host serves the table as it is now (or later);
        False if that took longer than ``2 * refresh_interval + 2`` seconds (the
        change still arrives once the refresh succeeds) or the table is not watched."""
        try:
            revision = await self.models.revision()
        except Exception as exc:  # the write is done; only the wait is lost
            _log.warning("cannot read the models table's revision: %s", exc)
            return False
        if revision is None:
            return False
        self.plane.request_refresh()
        timeout = 2 * self.settings.refresh_interval + 2
        return await self.plane.wait_served(MODELS.name, {"models": revision}, timeout)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, metrics: Metrics) -> None:
        """Migrate (one worker applies, the others wait), watch the datasets' tables,
        then start the refresh loop."""
        settings = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._database = open_database(settings, metrics.counts(metrics.database_queries))
        counts = PlaneCounts(
            metrics.count(metrics.refresh_runs),
            metrics.count(metrics.refresh_failures),
            metrics.count(metrics.leader_changes),
        )
        self._models = ModelRepository(self._database)
        loop = asyncio.get_running_loop()
        if settings.auto_migrate:
            applied = await loop.run_in_executor(None, self._migrate)
            self.migrations_applied = len(applied)
        for source, error in self.failed_sources.items():
            if self._on_source_failure is not None:
                self._on_source_failure(source, error)
        datasets = [
            d for d in self.datasets.values() if self._owners.get(d.name) not in self.failed_sources
        ]
        tables = {table for dataset in datasets for table in dataset.tables}
        self.unwatched = await loop.run_in_executor(
            None,
            partial(
                watch_tables,
                settings.database_target,
                settings.database_busy_timeout,
                tables,
                install=settings.auto_migrate,
            ),
        )
        for table, error in self.unwatched.items():
            names = [d.name for d in datasets if table in d.tables]
            _log.warning("table %r (datasets %s) cannot be watched: %s", table, names, error)
        plane = self._plane = DataPlane(
            self.data_dir,
            settings.refresh_interval,
            self._database,
            datasets,
            counts,
            cluster=self._cluster_feed() if settings.coordination_url else None,
        )
        self._cache = ServiceCache(
            settings.cache_ttl,
            lambda: ServiceCache.snapshot_scope(plane.snapshot.stamp if plane.snapshot else "0"),
            lookups=metrics.counts(metrics.cache_requests),
            loads=metrics.counts(metrics.cache_loads),
            backend=self._shared_cache() if settings.cache_backend == "redis" else None,
        )
        metrics.on_sample(self._sample)
        await self.check_schema()
        plane.on_swap(self._swapped)
        self._task = loop.create_task(plane.run())

    async def stop(self) -> None:
        """Stop refreshing (the leader lock is released), close the cache and database."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
        if self._cache is not None:
            await self._cache.close()
        if self._database is not None:
            await self._database.close()

    async def check_schema(self) -> SchemaStatus:
        """Compare the database with the migration files (in the pool: it blocks)."""
        loop = asyncio.get_running_loop()
        self.schema = await loop.run_in_executor(
            None, schema_status, self.settings.database_target, self.settings.database_busy_timeout
        )
        return self.schema

    async def readiness(self) -> Readiness:
        """Schema current, snapshot loaded, required datasets loaded and fresh enough."""
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
        snapshot = plane.snapshot
        if snapshot is None:
            ready.problems.append("no snapshot loaded yet")
        freshness = plane.freshness()
        now = time.time()
        limit = self.settings.snapshot_max_staleness
        stale = sorted(snapshot.trouble) if snapshot else []
        ready.checks.update(
            schema_version=schema.current if schema else None,
            generation=plane.generation,
            stale=freshness.failing_since is not None or bool(stale),
            stale_since=freshness.failing_since,
            stale_datasets=stale,
            last_refresh_age=None
            if freshness.checked_at is None
            else round(now - freshness.checked_at, 3),
        )
        coordination = freshness.data.get("coordination")
        if coordination is not None:
            ready.checks["coordination"] = coordination
            if not coordination.get("connected", True):
                since = coordination.get("unreachable_since") or now
                ready.checks["degraded"] = (
                    f"Redis unreachable for {now - since:.0f} s ({coordination.get('error')}): "
                    "serving this host's last snapshot; changes arrive when it is back"
                )
        if freshness.failing_since is not None:
            age = now - (freshness.checked_at or freshness.failing_since)
            if limit and age > limit:
                ready.problems.append(
                    f"data is stale: the database has failed since "
                    f"{time.strftime('%H:%M:%S', time.localtime(freshness.failing_since))} "
                    f"({freshness.error}); serving a snapshot {age:.0f} s old"
                )
        if snapshot is not None:
            for name, dataset in self.datasets.items():
                trouble = snapshot.trouble.get(name)
                if not dataset.required:
                    continue
                if name not in snapshot.datasets:
                    why = trouble.error if trouble else "not loaded yet"
                    ready.problems.append(f"dataset {name!r} has never loaded: {why}")
                elif trouble and limit and now - trouble.failing_since > limit:
                    ready.problems.append(
                        f"dataset {name!r} is stale: its load has failed for "
                        f"{now - trouble.failing_since:.0f} s ({trouble.error})"
                    )
        return ready

    def identity(self) -> dict[str, Any]:
        """This worker's part in the data plane, and each dataset's served version."""
        plane = self.plane
        snapshot = plane.snapshot
        return {
            "role": plane.role,
            "coordination": plane.feed.health() if plane.feed else {"backend": "local"},
            "generation": plane.generation,
            "snapshot_age": None
            if snapshot is None
            else round(time.time() - snapshot.loaded_at, 3),
            "models": sorted(snapshot.models) if snapshot and "models" in snapshot.datasets else [],
            "datasets": self._datasets_identity(snapshot),
            "unwatched_tables": dict(self.unwatched),
            "database": self.database.identity(),
            "queries": self.database.queries.as_dict(),
            "migrations_applied": self.migrations_applied,
            **plane.counts.as_dict(),
            "cache": self.cache.identity(),
        }

    # -- internals ------------------------------------------------------------------------

    def _datasets_identity(self, snapshot: Snapshot | None) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in self.datasets:
            view = snapshot.datasets.get(name) if snapshot else None
            trouble = snapshot.trouble.get(name) if snapshot else None
            # "is not None": a view without rows is falsy.
            found[name] = {
                "version": view.version if view is not None else None,
                "stamp": view.stamp if view is not None else None,
                "rows": len(view) if view is not None else None,
                "loaded_at": view.loaded_at if view is not None else None,
                "revisions": dict(self.plane.revisions(name)),
                "stale": trouble is not None,
                "error": trouble.error if trouble else None,
                "failing_since": trouble.failing_since if trouble else None,
            }
        return found

    def _shared_cache(self) -> CacheBackend:
        """The cache every worker of every host shares (Redis; single flight across
        processes, so hosts that miss one key together load it once)."""
        from ..coordination.redis import connect
        from ..coordination.redis_cache import RedisCacheBackend

        settings = self.settings
        client = connect(settings.cache_url or settings.coordination_url)
        return RedisCacheBackend(
            client, prefix=settings.coordination_prefix, owns_client=True, single_flight=True
        )

    def _cluster_feed(self) -> Callable[[Poll], ClusterFeed]:
        """How a host leader joins the cluster (Redis; imported only when configured)."""
        from ..coordination.redis import connect
        from .cluster import ClusterFeed

        settings = self.settings
        client = self._redis = connect(settings.coordination_url)

        def feed(poll: Poll) -> ClusterFeed:
            return ClusterFeed(
                client,
                prefix=settings.coordination_prefix,
                interval=settings.refresh_interval,
                lease_ttl=settings.leader_lease_ttl,
                poll=poll,
            )

        return feed

    def _migrate(self) -> list[Any]:
        """Apply every source's migrations (blocking: run in the pool). A team's
        failure is recorded (and reported on the loop) when a handler is set."""

        def failed(source: MigrationSource, error: MigrationError) -> None:
            self.failed_sources[source.name] = str(error)

        return apply_migrations(
            self.settings.database_target,
            self.settings.database_busy_timeout,
            self.sources,
            on_failure=failed if self._on_source_failure is not None else None,
        )

    async def _first_snapshot(self) -> Snapshot:
        return await self.plane.first_snapshot()

    def _sample(self, metrics: Metrics) -> None:
        plane = self.plane
        metrics.is_leader.set(1 if plane.role == "leader" else 0)
        metrics.snapshot_generation.set(plane.generation)

    def _swapped(self, old: Snapshot | None, new: Snapshot) -> None:
        if old is None:
            return
        changed = [
            name for name, view in new.datasets.items() if old.datasets.get(name) is not view
        ]
        if changed:
            self._registry.rebuild_dependents(changed)
        # Old scopes are already unreachable; retiring them frees their memory now.
        task = asyncio.get_running_loop().create_task(
            self.cache.retire(ServiceCache.snapshot_scope(new.stamp), new.stamps())
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    def _started(value: T | None) -> T:
        if value is None:
            raise RuntimeError(
                "the worker has not started: the data layer exists only while serving"
            )
        return value
