"""The PostgreSQL backend against a real server (no mocks): placeholders, rows, errors,
copy_query into a dataset file, migrations (fresh, idempotent, rollback, downgrade,
team sources, concurrent appliers under the advisory lock) and the change markers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quart_service import Settings
from quart_service.data import MigrationError, apply_migrations, schema_status
from quart_service.data.layer import open_database
from quart_service.data.markers import MARKERS_QUERY, watch_tables
from quart_service.data.migrations import (
    SERVICE,
    MigrationSource,
    downgrade,
    migrate_to,
    migration_lock,
)
from quart_service.data.models import ModelRepository
from quart_service.data.postgres import PostgresDatabase, translate
from quart_service.data.published import DatasetView
from quart_service.errors import DatabaseBusy, DatabaseUnavailable, SettingsError

from .support.postgres import PostgresServer, postgres_server
from .support.server import ROOT
from .test_migrations import _script

# -- placeholders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", "SELECT 1"),
        ("SELECT ?, ?", "SELECT $1, $2"),
        ("WHERE a = ? AND b = '?' AND c = ?", "WHERE a = $1 AND b = '?' AND c = $2"),
        ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', $1"),
        ('SELECT "odd?col" FROM t WHERE x = ?', 'SELECT "odd?col" FROM t WHERE x = $1'),
        ("SELECT ? -- why?\n, ?", "SELECT $1 -- why?\n, $2"),
        ("SELECT /* ? */ ?", "SELECT /* ? */ $1"),
        ("SELECT $$a ? b$$, ?", "SELECT $$a ? b$$, $1"),
        ("SELECT $tag$ ? $tag$ || ?", "SELECT $tag$ ? $tag$ || $1"),
        ("SELECT jsonb '{}' ? 'k'", "SELECT jsonb '{}' $1 'k'"),  # ? is always a parameter
        ("SELECT '?", "SELECT '?"),  # unterminated: left alone
    ],
)
def test_question_marks_become_numbered_parameters_outside_quotes(sql: str, expected: str) -> None:
    assert translate(sql) == expected


_PIECES = [" ? ", "'a?'", "'it''s?'", '"b?"', " x ", "-- c?\n", "/* ? */", "$$ ? $$", "$q$?$q$"]


@given(st.lists(st.sampled_from(_PIECES), max_size=30))
def test_every_bare_question_mark_and_only_those_are_numbered(pieces: list[str]) -> None:
    sql = "".join(pieces)
    expected = "".join(
        piece.replace("?", "{}") if piece == " ? " else piece for piece in pieces
    ).format(*(f"${n}" for n in range(1, pieces.count(" ? ") + 1)))
    assert translate(sql) == expected


def test_database_url_is_checked_and_masked() -> None:
    with pytest.raises(SettingsError, match="database_url"):
        Settings(database_url="mysql://x@y/z")
    settings = Settings(database_url="postgresql://u:pw@h/db", database_pool_size=2)
    assert settings.database_target == "postgresql://u:pw@h/db"
    assert Settings(data_dir="d").database_target == Path("d") / "quart_service.db"
    shown = {name: value for name, _type, value, _doc in settings.describe()}
    assert shown["database_url"] == "***"
    assert shown["database_pool_size"] == 2
    with pytest.raises(SettingsError, match="database_pool_size"):
        Settings(database_pool_size=0)


# -- the backend ------------------------------------------------------------------------


def _settings(url: str, **extra: Any) -> Settings:
    return Settings(database_url=url, database_busy_timeout=0.5, **extra)


async def test_rows_placeholders_counts_and_rowcounts(pg_url: str) -> None:
    database = open_database(_settings(pg_url, database_pool_size=2))
    assert isinstance(database, PostgresDatabase)
    assert not database.is_open
    try:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, note TEXT)")
        for n in range(3):
            await database.execute(
                "INSERT INTO t (id, name, note) VALUES (?, ?, '?')", (n, f"n{n}")
            )
        assert database.is_open
        assert await database.execute("UPDATE t SET name = ? WHERE id > ?", ("x", 0)) == 2
        rows = await database.fetchall("SELECT id, name, note FROM t ORDER BY id")
        assert [(r["id"], r[1], dict(r)["note"]) for r in rows] == [
            (0, "n0", "?"),
            (1, "x", "?"),
            (2, "x", "?"),
        ]
        assert dict(rows[0]) == {"id": 0, "name": "n0", "note": "?"}
        row = await database.fetchone("SELECT name FROM t WHERE id = ?", (0,), kind="poll")
        assert row is not None
        assert row["name"] == row[0] == "n0"
        assert await database.fetchone("SELECT name FROM t WHERE id = ?", (9,)) is None
        assert database.queries.as_dict() == {"write": 5, "read": 2, "poll": 1}
        identity = database.identity()
        assert identity["open"]
        assert identity["pool_size"] == 2
    finally:
        await database.close()
    assert not database.is_open


async def test_a_password_never_shows_in_identity() -> None:
    database = PostgresDatabase("postgresql://u:secret@127.0.0.1:1/db", 1.0)
    assert database.identity()["url"] == "postgresql://u:***@127.0.0.1:1/db"


async def test_a_lock_wait_beyond_the_busy_timeout_is_database_busy(pg_url: str) -> None:
    database = open_database(_settings(pg_url))
    holder = await asyncpg.connect(pg_url)
    try:
        await database.execute("CREATE TABLE t (x INTEGER)")
        async with holder.transaction():
            await holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(DatabaseBusy) as raised:
                await database.execute("INSERT INTO t VALUES (?)", (1,))
            assert time.monotonic() - started < 3
        assert raised.value.retry_after == 1.0
        # The lock is gone: the same pool goes on.
        assert await database.execute("INSERT INTO t VALUES (?)", (1,)) == 1
    finally:
        await holder.close()
        await database.close()


async def test_a_stopped_server_is_database_unavailable_then_recovers() -> None:
    with postgres_server() as server:
        database = open_database(_settings(server.url()))
        try:
            await database.execute("CREATE TABLE t (x INTEGER)")
            server.stop()
            with pytest.raises(DatabaseUnavailable) as raised:
                await database.fetchall("SELECT x FROM t")
            assert raised.value.retry_after == 5.0
            await database.close()  # what the refresh leader does after a failed poll
            with pytest.raises(DatabaseUnavailable):  # refused: nobody listens
                await database.fetchall("SELECT x FROM t")
            server.start()
            assert await database.fetchall("SELECT x FROM t") == []
        finally:
            await database.close()


async def test_an_unknown_database_is_unavailable(postgres: PostgresServer) -> None:
    database = open_database(_settings(postgres.url("no_such_database")))
    with pytest.raises(DatabaseUnavailable):
        await database.fetchall("SELECT 1")
    await database.close()


async def test_copy_query_streams_rows_into_a_dataset_file(pg_url: str, tmp_path: Path) -> None:
    database = open_database(_settings(pg_url))
    try:
        await database.execute(
            "CREATE TABLE flags (name TEXT PRIMARY KEY, enabled INTEGER, weight DOUBLE PRECISION)"
        )
        await database.execute(
            "INSERT INTO flags SELECT 'f' || n, n % 2, n / 10.0 FROM generate_series(1, 12345) n"
        )
        path = tmp_path / "flags" / "1.sqlite"
        published = await database.copy_query(
            "SELECT name, enabled, weight FROM flags ORDER BY name",
            path,
            key="name",
        )
        assert published.rows == 12345
        assert published.columns == ("name", "enabled", "weight")
        view: DatasetView[None] = DatasetView(
            "flags",
            1,
            path,
            columns=published.columns,
            rows=published.rows,
            key="name",
            loaded_at=time.time(),
            build=lambda v: None,
        )
        row = view.get("f7")
        assert row is not None
        assert (row["enabled"], row["weight"]) == (1, 0.7)
        assert len(view.select("weight > ?", [1234])) == 12345 - 12340
        view.close()
        assert database.queries.as_dict()["load"] == 1
        empty = await database.copy_query("SELECT name FROM flags WHERE false", tmp_path / "e")
        assert empty.rows == 0
        # A mistake in the query is the query's error, not "unavailable".
        with pytest.raises(asyncpg.InterfaceError, match="expects 1 argument"):
            await database.copy_query("SELECT name FROM flags WHERE name = ?", tmp_path / "q")
    finally:
        await database.close()


async def test_the_models_repository_runs_on_postgres(pg_url: str) -> None:
    apply_migrations(pg_url)
    database = open_database(_settings(pg_url))
    models = ModelRepository(database)
    try:
        created = await models.create("m", "local", {"order": 2}, enabled=True)
        assert created.parameters == {"order": 2}
        assert created.enabled
        assert created.updated_at.endswith("Z")
        updated = await models.update("m", enabled=False, parameters={"order": 4})
        assert updated is not None
        assert not updated.enabled
        assert updated.parameters == {"order": 4}
        assert await models.update("absent", enabled=False) is None
        assert [m.name for m in await models.all()] == ["local-ngram", "m"]
        # The JSON check holds on PostgreSQL too.
        with pytest.raises(asyncpg.PostgresError):
            await database.execute("UPDATE models SET parameters = ? WHERE name = 'm'", ("{",))
    finally:
        await database.close()


# -- migrations --------------------------------------------------------------------------


def _pg(url: str, sql: str) -> list[Any]:
    async def run() -> list[Any]:
        connection = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await connection.fetch(sql)]
        finally:
            await connection.close()

    return asyncio.run(run())


def _tables(url: str) -> set[str]:
    rows = _pg(url, "SELECT table_name FROM information_schema.tables WHERE table_schema='public'")
    return {r[0] for r in rows}


def test_migrations_apply_once_and_the_cheap_path_imports_no_alembic(pg_url: str) -> None:
    assert schema_status(pg_url).behind
    assert [m.version for m in apply_migrations(pg_url)] == [1, 2, 3]
    assert _tables(pg_url) == {"alembic_version", "models", "table_revisions"}
    assert _pg(pg_url, "SELECT version_num FROM alembic_version") == [("0003",)]
    assert _pg(pg_url, "SELECT name, parameters FROM models") == [("local-ngram", '{"order": 3}')]
    assert apply_migrations(pg_url) == []
    code = (
        "import sys\n"
        "from quart_service.data.migrations import apply_migrations, schema_status\n"
        f"assert apply_migrations({pg_url!r}) == []\n"
        f"assert not schema_status({pg_url!r}).behind\n"
        "print(sorted(m for m in ('alembic', 'sqlalchemy', 'asyncpg') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_a_failing_revision_is_rolled_back_on_postgres(pg_url: str, tmp_path: Path) -> None:
    source = MigrationSource("service", tmp_path / "m")
    _script(source.directory, 1, "create", ["CREATE TABLE t (x INTEGER)"])
    _script(
        source.directory,
        2,
        "broken",
        ["CREATE TABLE u (y INTEGER)", "ALTER TABLE t ADD COLUMN z TEXT", "SELECT * FROM missing"],
    )
    with pytest.raises(MigrationError) as raised:
        apply_migrations(pg_url, sources=[source])
    message = str(raised.value)
    assert message.startswith(
        "migration 0002_broken.py of 'service' failed and was rolled back: UndefinedTable:"
    ), message
    assert _tables(pg_url) == {"alembic_version", "t"}
    assert _pg(pg_url, "SELECT version_num FROM alembic_version") == [("0001",)]
    assert schema_status(pg_url, sources=[source]).current == 1


def test_downgrade_and_up_again_on_postgres(pg_url: str) -> None:
    apply_migrations(pg_url)
    watch_tables(pg_url, 5.0, ["models"])
    assert [m.version for m in downgrade(pg_url, 5.0, SERVICE, 2)] == [3]
    assert _tables(pg_url) == {"alembic_version", "models", "change_marker"}
    # The 0001 trigger is back: a write moves the old single marker.
    _pg(pg_url, "UPDATE models SET enabled = 0")
    assert _pg(pg_url, "SELECT revision FROM change_marker") == [(2,)]  # insert, update
    assert [m.version for m in downgrade(pg_url, 5.0, SERVICE, 0)] == [2, 1]
    assert _tables(pg_url) == {"alembic_version"}
    assert [m.version for m in migrate_to(pg_url, 5.0, SERVICE, 3)] == [1, 2, 3]
    assert _pg(pg_url, "SELECT table_name, revision FROM table_revisions") == [("models", 1)]


def test_a_team_source_keeps_its_own_version_table_on_postgres(pg_url: str, tmp_path: Path) -> None:
    team = MigrationSource("team-x", tmp_path / "team")
    _script(
        team.directory, 1, "create", ["CREATE TABLE prompts (name TEXT)"], ["DROP TABLE prompts"]
    )
    applied = apply_migrations(pg_url, sources=[SERVICE, team])
    assert [(m.source, m.version) for m in applied][-1] == ("team-x", 1)
    assert _pg(pg_url, "SELECT version_num FROM alembic_version_team_x") == [("0001",)]
    assert schema_status(pg_url, sources=[SERVICE, team]).sources == {
        "service": (3, 3),
        "team-x": (1, 1),
    }
    assert [m.version for m in downgrade(pg_url, 5.0, team, 0)] == [1]
    assert "prompts" not in _tables(pg_url)


_APPLIER = """
import json, sys, time
from quart_service.data.migrations import apply_migrations
url, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
print(json.dumps([m.version for m in apply_migrations(url)]))
"""


def test_concurrent_appliers_apply_each_revision_once_under_the_advisory_lock(
    pg_url: str,
) -> None:
    start = time.time() + 2.0  # all four import first, then race
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _APPLIER, pg_url, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for _ in range(4)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(results) == [[], [], [], [1, 2, 3]]
    assert _pg(pg_url, "SELECT count(*) FROM models") == [(1,)]


def test_the_migration_lock_waits_longer_than_the_busy_timeout(pg_url: str) -> None:
    """A worker started with a short busy timeout waits for the applier, however long
    it takes (the flock does; lock_timeout would otherwise cut the advisory wait)."""
    held = threading.Event()

    def hold() -> None:
        with migration_lock(pg_url):
            held.set()
            time.sleep(1.5)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        assert [m.version for m in apply_migrations(pg_url, 0.2)] == [1, 2, 3]
        assert time.monotonic() - started >= 1.0
    finally:
        holder.join()
    with migration_lock(pg_url), pytest.raises(MigrationError, match="not re-entrant"):
        apply_migrations(pg_url)


# -- markers -----------------------------------------------------------------------------


def test_markers_install_once_and_a_psql_write_moves_the_revision(
    postgres: PostgresServer, pg_url: str
) -> None:
    apply_migrations(pg_url)
    name = pg_url.rsplit("/", 1)[1]
    postgres.psql("CREATE TABLE flags (name TEXT PRIMARY KEY, enabled INTEGER)", database=name)
    # auto_migrate off: reported, not installed.
    assert set(watch_tables(pg_url, 5.0, ["flags"], install=False)) == {"flags"}
    errors = watch_tables(pg_url, 5.0, ["flags", "models", "absent"])
    assert set(errors) == {"absent"}
    assert "UndefinedTable" in errors["absent"]
    assert watch_tables(pg_url, 5.0, ["flags", "models"]) == {}  # installed: one read
    before = dict(_pg(pg_url, MARKERS_QUERY))
    # One statement touching many rows is one bump (statement-level trigger).
    postgres.psql("INSERT INTO flags SELECT 'f' || n, 1 FROM generate_series(1, 50) n", name)
    postgres.psql("DELETE FROM flags WHERE name = 'f1'", name)
    after = dict(_pg(pg_url, MARKERS_QUERY))
    assert after["flags"] == before["flags"] + 2
    assert after["models"] == before["models"]
    triggers = _pg(
        pg_url,
        "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgname",
    )
    assert triggers == [("qs_revision_flags",), ("qs_revision_models",)]
