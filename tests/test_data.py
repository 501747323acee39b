"""The data plane's parts in process: migrations, files, lock, cache."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from quart_service import ServiceCache
from quart_service.coordination import LeaderLock, PublishedFile
from quart_service.data import MigrationError, apply_migrations, schema_status
from quart_service.data.migrations import discover


def _write(directory: Path, name: str, sql: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(sql)


def test_migrations_apply_in_order_once(tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    _write(migrations, "0002_add_column.sql", "ALTER TABLE t ADD COLUMN y TEXT;")
    _write(migrations, "0001_create.sql", "-- the table\nCREATE TABLE t (x INTEGER);")
    database = tmp_path / "db.sqlite"
    assert schema_status(database, directory=migrations).behind
    applied = apply_migrations(database, directory=migrations)
    assert [m.version for m in applied] == [1, 2]
    assert apply_migrations(database, directory=migrations) == []
    status = schema_status(database, directory=migrations)
    assert (status.current, status.latest, status.behind) == (2, 2, False)


def test_a_failing_migration_is_rolled_back_and_named(tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    _write(migrations, "0001_create.sql", "CREATE TABLE t (x INTEGER);")
    _write(
        migrations,
        "0002_broken.sql",
        "CREATE TABLE u (y INTEGER);\nINSERT INTO missing VALUES (1);",
    )
    database = tmp_path / "db.sqlite"
    with pytest.raises(MigrationError, match=r"0002_broken\.sql failed and was rolled back"):
        apply_migrations(database, directory=migrations)
    with contextlib.closing(sqlite3.connect(database)) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "t" in tables
    assert "u" not in tables  # the failed file left nothing behind
    assert schema_status(database, directory=migrations).current == 1


def test_badly_named_or_duplicate_migration_files_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a", "1_create.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match=r"must be named NNNN_description\.sql"):
        discover(tmp_path / "a")
    _write(tmp_path / "b", "0001_one.sql", "SELECT 1;")
    _write(tmp_path / "b", "0001_two.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match="two migration files have version 1"):
        discover(tmp_path / "b")


def test_shipped_migrations_create_the_change_marker_triggers(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    apply_migrations(database)
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:

        def revision() -> int:
            return int(
                db.execute(
                    "SELECT revision FROM table_revisions WHERE table_name = 'models'"
                ).fetchone()[0]
            )

        start = revision()
        db.execute("INSERT INTO models (name, engine) VALUES ('a', 'local')")
        db.execute("UPDATE models SET enabled = 0 WHERE name = 'a'")
        db.execute("DELETE FROM models WHERE name = 'a'")
        assert revision() == start + 3
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO models (name, engine, parameters) VALUES ('b', 'x', 'nope')")


def test_published_file_is_noticed_once_per_change(tmp_path: Path) -> None:
    writer = PublishedFile(tmp_path / "snap.json")
    reader = PublishedFile(tmp_path / "snap.json")
    assert reader.read_if_changed() is None
    writer.publish("one")
    assert reader.read_if_changed() == "one"
    assert reader.read_if_changed() is None
    writer.publish("two")
    assert reader.read_if_changed() == "two"


def test_leader_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    first, second = LeaderLock(tmp_path / "l.lock"), LeaderLock(tmp_path / "l.lock")
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    assert second.held
    assert not first.held
    second.release()


async def test_cache_single_flight_errors_and_none_values() -> None:
    generation = 1
    cache = ServiceCache(60, lambda: generation)
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise ConnectionError("backend down")

    results = await asyncio.gather(
        *(cache.get_or_load("k", failing) for _ in range(20)), return_exceptions=True
    )
    assert calls == 1  # one load for twenty concurrent misses
    assert all(isinstance(r, ConnectionError) for r in results)

    async def nothing() -> int | None:
        nonlocal calls
        calls += 1
        return None

    assert await cache.get_or_load("k", nothing) is None  # the error was not cached
    assert await cache.get_or_load("k", nothing) is None  # a cached None is a hit
    assert calls == 2
    generation = 2  # a new generation: the old entry is unreachable
    assert await cache.get_or_load("k", nothing) is None
    assert calls == 3
    # 20 concurrent misses, one retry after the error, one in the new generation.
    assert cache.identity() == {"hits": 1, "misses": 22, "loads": 2, "load_errors": 1}
    await cache.close()
