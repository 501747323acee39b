"""Schema migrations: numbered SQL files applied in order, once, under a file lock.

Files are named ``NNNN_description.sql``. They live in the repository's top-level
``migrations/`` folder, and ship inside the wheel as ``quart_service/migrations/``
(in a checkout that path is a link to the top-level folder), so an installed service
finds its schema. Each file is
applied in one transaction together with its row in ``schema_migrations``; a file that
fails leaves the database as it was. When N workers start at the same instant, an
exclusive ``flock`` on ``<database>.migrate.lock`` lets exactly one apply; the others
wait on the lock and then find nothing left to do.

These functions block (they use the stdlib ``sqlite3``): call them from the pool or a
CLI, not on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MigrationError

__all__ = [
    "MIGRATIONS_DIR",
    "Migration",
    "SchemaStatus",
    "apply_migrations",
    "discover",
    "schema_status",
]

_log = logging.getLogger("quart_service.data")

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file."""

    version: int
    name: str
    path: Path


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where the database's schema stands against the files."""

    current: int
    latest: int

    @property
    def behind(self) -> bool:
        """Files exist that the database has not applied."""
        return self.current < self.latest


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files, in version order; a stray or duplicate name is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"migration file {path.name!r} must be named NNNN_description.sql "
                "(4 digits, lower-case words)"
            )
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"two migration files have version {version}: "
                f"{found[version].path.name} and {path.name}"
            )
        found[version] = Migration(version, match.group(2), path)
    return [found[v] for v in sorted(found)]


def _connect(database: Path, busy_timeout: float) -> sqlite3.Connection:
    """A stdlib connection in autocommit mode, WAL journal, with a busy timeout."""
    database.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(database, timeout=busy_timeout, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    return connection


def _ensure_table(connection: sqlite3.Connection) -> None:
    connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at REAL NOT NULL, applied_by_pid INTEGER NOT NULL)"
    )


def _current(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0])


def schema_status(
    database: Path, busy_timeout: float = 5.0, directory: Path = MIGRATIONS_DIR
) -> SchemaStatus:
    """Compare the database with the files (a missing database is at version 0)."""
    latest = max((m.version for m in discover(directory)), default=0)
    if not database.exists():
        return SchemaStatus(0, latest)
    uri = f"file:{database}?mode=ro"
    # closing(): sqlite3's own context manager commits but leaves the connection open.
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout)) as connection:
        exists = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).fetchone()
        current = _current(connection) if exists else 0
    return SchemaStatus(current, latest)


def apply_migrations(
    database: Path, busy_timeout: float = 5.0, directory: Path = MIGRATIONS_DIR
) -> list[Migration]:
    """Apply the pending files in order; returns those this call applied."""
    migrations = discover(directory)
    database.parent.mkdir(parents=True, exist_ok=True)
    lock_path = database.with_name(database.name + ".migrate.lock")
    with open(lock_path, "a+b") as lock:
        # Blocks while another process migrates; released by the kernel if it dies.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            connection = _connect(database, busy_timeout)
            try:
                return _apply_pending(connection, migrations)
            finally:
                connection.close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _apply_pending(connection: sqlite3.Connection, migrations: list[Migration]) -> list[Migration]:
    _ensure_table(connection)
    current = _current(connection)
    applied: list[Migration] = []
    for migration in migrations:
        if migration.version <= current:
            continue
        sql = migration.path.read_text(encoding="utf-8")
        try:
            connection.execute("BEGIN IMMEDIATE")
            # executescript() would COMMIT first; split the script and run it in ours.
            for statement in _statements(sql):
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                (migration.version, migration.name, time.time(), os.getpid()),
            )
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise MigrationError(
                f"migration {migration.path.name} failed and was rolled back: {exc}"
            ) from exc
        _log.info("applied migration %s", migration.path.name)
        applied.append(migration)
    return applied


def _statements(sql: str) -> list[str]:
    """Split a script into complete statements (trigger bodies stay whole)."""
    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--") and not buffer.strip():
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise MigrationError(f"a migration ends in an incomplete statement: {buffer.strip()!r}")
    return statements
