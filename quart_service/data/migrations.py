"""Schema migrations: Alembic revision scripts, applied once, under a file lock.

A *source* of migrations is a folder of Alembic revision scripts with its own linear
history and its own version table: the service's (``SERVICE``, the repository's
top-level ``migrations/`` folder, shipped in the wheel as ``quart_service/migrations/``;
in a checkout that path is a link) records its version in ``alembic_version``; a
team plugin's source named ``team-x`` in ``alembic_version_team_x``.

The convention, checked by :func:`discover` before anything runs: each script is
named ``NNNN_slug.py`` and says ``revision = "NNNN"`` and ``down_revision =
"NNNN-1"`` (``None`` for ``0001``); the numbers run 1, 2, 3... without a gap. So the
version of a source is a plain number, which the cheap path compares.

Importing Alembic and SQLAlchemy costs a worker about 0.24 s and 36 MB. So
:func:`schema_status` reads the version tables with the stdlib ``sqlite3``, and
:func:`apply_migrations` takes the lock, looks the same way, and imports Alembic
(``_alembic_run``) only when a source has something to apply. When N workers start
at the same instant, the exclusive ``flock`` on ``<database>.migrate.lock`` lets
exactly one apply; the others wait on it and then find nothing left to do.

Each revision runs in its own transaction together with its version-table update; a
revision that fails is rolled back and leaves the database as the previous one left
it. A database that the SQL-file migrator of earlier releases migrated (rows in
``schema_migrations``, no ``alembic_version``) is adopted: stamped at its last
version, then upgraded; ``schema_migrations`` stays as it was.

The database is a SQLite file (a :class:`~pathlib.Path`) or a ``postgresql://`` URL
(``Settings.database_target``). On PostgreSQL the version tables are read with
``psycopg`` (no Alembic either), Alembic runs on SQLAlchemy's psycopg dialect, and
the lock is a session ``pg_advisory_lock`` shared by every host.

These functions block: call them from the pool or a CLI, not on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MigrationError
from .database import is_postgres, redact

__all__ = [
    "MIGRATIONS_DIR",
    "MIGRATION_LOCK_KEY",
    "SERVICE",
    "FailureHandler",
    "Migration",
    "MigrationSource",
    "SchemaStatus",
    "Target",
    "apply_migrations",
    "discover",
    "downgrade",
    "migrate_to",
    "migration_lock",
    "pg_connect",
    "schema_status",
]

_log = logging.getLogger("quart_service.data")

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.py$")
# A module-level assignment, annotated or not: ``revision: str = "0002"  # note``.
_ASSIGNMENT = re.compile(
    r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(.*?)\s*(?:#.*)?$", re.MULTILINE
)
_VALUE = re.compile(r"""^(?:None|"(\d{4})"|'(\d{4})')$""")
_SLUG = re.compile(r"[^a-z0-9]")
_LEGACY_TABLE = "schema_migrations"

FailureHandler = Callable[["MigrationSource", MigrationError], None]
#: A SQLite file, or a ``postgresql://`` URL (``Settings.database_target``).
Target = Path | str


@dataclass(frozen=True, slots=True)
class MigrationSource:
    """A folder of revision scripts with its own history (the service, or a team's)."""

    name: str
    directory: Path

    @property
    def version_table(self) -> str:
        """``alembic_version`` for the service, ``alembic_version_<slug>`` otherwise."""
        if self.name == "service":
            return "alembic_version"
        return "alembic_version_" + _SLUG.sub("_", self.name.lower())


SERVICE = MigrationSource("service", MIGRATIONS_DIR)


@dataclass(frozen=True, slots=True)
class Migration:
    """One revision script of a source."""

    version: int
    name: str
    path: Path
    source: str = SERVICE.name


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where the database stands against the scripts.

    ``current`` and ``latest`` are the service's (the first source asked about, when
    the service is not among them); ``sources`` has ``(current, latest)`` per source.
    """

    current: int
    latest: int
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def behind(self) -> bool:
        """The service has scripts that the database has not applied."""
        return self.current < self.latest

    @property
    def pending(self) -> list[str]:
        """The sources, of those asked about, with scripts not applied yet."""
        return [name for name, (current, latest) in self.sources.items() if current < latest]


def discover(directory: Path = MIGRATIONS_DIR, source: str = SERVICE.name) -> list[Migration]:
    """The revision scripts of a folder, in order; the convention is checked here
    (no Alembic import): a stray name, a duplicate number, a gap or a revision id
    that does not match the file's number is a :class:`MigrationError` naming it."""
    where = f"migration folder {str(directory)!r} of {source!r}"
    if not directory.is_dir():
        raise MigrationError(f"{where} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.is_dir() or path.name == "__init__.py" or path.suffix != ".py":
            if path.suffix == ".sql":
                raise MigrationError(
                    f"{where}: SQL files are no longer applied; rewrite {path.name} as an "
                    "Alembic revision script NNNN_slug.py"
                )
            continue
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(
                f"{where}: {path.name!r} must be named NNNN_slug.py (4 digits, lower-case words)"
            )
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"{where}: two migration files have number {version}: "
                f"{found[version].path.name} and {path.name}"
            )
        found[version] = Migration(version, match.group(2), path, source)
    migrations = [found[v] for v in sorted(found)]
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"{where}: numbers must run 1, 2, 3... without a gap: "
                f"{migration.path.name} where {expected:04d} was expected"
            )
        _check_ids(migration, where)
    return migrations


def _check_ids(migration: Migration, where: str) -> None:
    """``revision = "NNNN"`` and ``down_revision = "NNNN-1"`` (None for 0001)."""
    text = migration.path.read_text(encoding="utf-8")
    values: dict[str, list[str]] = {"revision": [], "down_revision": []}
    for match in _ASSIGNMENT.finditer(text):
        values[match.group(1)].append(match.group(2))
    wanted = {
        "revision": f'"{migration.version:04d}"',
        "down_revision": f'"{migration.version - 1:04d}"' if migration.version > 1 else "None",
    }
    for key, found in values.items():
        if len(found) != 1:
            raise MigrationError(
                f"{where}: {migration.path.name} must assign {key} exactly once at the top "
                f"level (found {len(found)}); expected {key} = {wanted[key]}"
            )
        value = _VALUE.match(found[0])
        number = value and (value.group(1) or value.group(2))
        expected = None if wanted[key] == "None" else f"{wanted[key][1:-1]}"
        if value is None or number != expected:
            raise MigrationError(
                f"{where}: {migration.path.name} says {key} = {found[0]}; "
                f"expected {key} = {wanted[key]}"
            )


@dataclass(frozen=True, slots=True)
class _State:
    """One source, its scripts, and where the database stands."""

    source: MigrationSource
    migrations: list[Migration]
    current: int
    adopt: int | None = None  # the service's version in the old schema_migrations

    @property
    def latest(self) -> int:
        return len(self.migrations)

    @property
    def pending(self) -> bool:
        return self.current < self.latest or self.adopt is not None


_held = threading.local()


#: pg_advisory_lock's key for the migration lock: "quart_se" as a 64-bit number.
MIGRATION_LOCK_KEY = int.from_bytes(b"quart_se", "big") - (1 << 63)


@contextlib.contextmanager
def migration_lock(database: Target, busy_timeout: float = 5.0) -> Iterator[None]:
    """Hold the migration lock (blocking) while migrating or installing markers.

    SQLite: the exclusive ``flock`` on ``<database>.migrate.lock``. PostgreSQL: a
    session ``pg_advisory_lock`` on a connection of its own, shared by every host that
    uses the database. Either is released if the holder dies (the kernel closes the
    file, the server ends the session). Not re-entrant: taking it twice in one thread
    is an error rather than a deadlock; :func:`apply_migrations` releases it before it
    returns."""
    held: set[str] = _held.__dict__.setdefault("keys", set())
    if is_postgres(database):
        key = str(database)
    else:
        path = Path(database)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = str(path.with_name(path.name + ".migrate.lock").resolve())
    if key in held:
        shown = redact(key) if is_postgres(database) else key
        raise MigrationError(f"{shown} is already held by this thread (not re-entrant)")
    if is_postgres(database):
        with contextlib.closing(pg_connect(key, busy_timeout)) as pg:
            # Wait for the holder however long it migrates, as flock does: lock_timeout
            # (the busy timeout) bounds advisory lock waits too, so it is off here.
            pg.execute("SET lock_timeout = 0")
            pg.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            held.add(key)
            try:
                yield
            finally:
                held.discard(key)
                with contextlib.suppress(Exception):  # closing the session releases it too
                    pg.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        return
    with open(key, "a+b") as lock:
        # Blocks while another process migrates; released by the kernel if it dies.
        fcntl.flock(lock, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_sources(sources: Sequence[MigrationSource]) -> None:
    names = [s.name for s in sources]
    tables = [s.version_table for s in sources]
    if len(set(names)) != len(names) or len(set(tables)) != len(tables):
        raise MigrationError(f"migration sources need distinct names and version tables: {names}")
    if not all(names):
        raise MigrationError("a migration source needs a name")


class _Catalog:
    """Reads a database's version tables with its own driver (no Alembic): stdlib
    ``sqlite3`` for a SQLite file, ``psycopg`` for PostgreSQL."""

    def __init__(self, connection: Any, postgres: bool) -> None:
        self._connection = connection
        self._postgres = postgres

    def has_table(self, table: str) -> bool:
        if self._postgres:
            sql = (
                "SELECT 1 FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_name = %s"
            )
        else:
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._connection.execute(sql, (table,)).fetchone() is not None

    def rows(self, sql: str) -> list[Any]:
        return list(self._connection.execute(sql).fetchall())


def _read_version(catalog: _Catalog, table: str) -> int | None:
    """The number in a version table; None when the table does not exist."""
    if not catalog.has_table(table):
        return None
    rows = catalog.rows(f'SELECT version_num FROM "{table}"')
    if not rows:
        return 0
    if len(rows) > 1 or not re.fullmatch(r"\d{4}", str(rows[0][0])):
        found = ", ".join(repr(r[0]) for r in rows)
        raise MigrationError(f"version table {table} holds {found}; expected one 4-digit revision")
    return int(rows[0][0])


def _legacy_version(catalog: _Catalog) -> int | None:
    """The last version the SQL-file migrator recorded; None without its table."""
    if not catalog.has_table(_LEGACY_TABLE):
        return None
    (row,) = catalog.rows(f"SELECT max(version) FROM {_LEGACY_TABLE}")
    return int(row[0]) if row[0] is not None else None


def _state(catalog: _Catalog | None, source: MigrationSource) -> _State:
    migrations = discover(source.directory, source.name)
    if catalog is None:  # no database file yet
        return _State(source, migrations, 0)
    current = _read_version(catalog, source.version_table)
    if current is not None or source.name != SERVICE.name:
        return _State(source, migrations, current or 0)
    legacy = _legacy_version(catalog)
    if legacy is None:
        return _State(source, migrations, 0)
    return _State(source, migrations, legacy, adopt=legacy)


def pg_connect(url: str, busy_timeout: float = 5.0) -> Any:
    """A blocking ``psycopg`` connection in autocommit mode (the migrator's and the
    markers' driver on PostgreSQL; imported only when PostgreSQL is configured)."""
    import psycopg

    try:
        return psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=max(1, int(busy_timeout)),
            options=f"-c lock_timeout={int(busy_timeout * 1000)}",
            application_name="quart_service migrate",
        )
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        raise MigrationError(f"cannot connect to the PostgreSQL database: {reason}") from exc


@contextlib.contextmanager
def _reader(database: Target, busy_timeout: float) -> Iterator[_Catalog | None]:
    """A read-only look at the database, or None when the SQLite file does not exist."""
    if is_postgres(database):
        assert isinstance(database, str)
        with contextlib.closing(pg_connect(database, busy_timeout)) as pg:
            yield _Catalog(pg, postgres=True)
        return
    path = Path(database)
    if not path.exists():
        yield None
        return
    uri = path.resolve().as_uri() + "?mode=ro"
    # closing(): sqlite3's own context manager commits but leaves the connection open.
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout)) as connection:
        yield _Catalog(connection, postgres=False)


def schema_status(
    database: Target,
    busy_timeout: float = 5.0,
    sources: Sequence[MigrationSource] = (SERVICE,),
) -> SchemaStatus:
    """Compare the database with the scripts of each source (a missing database is at
    version 0). Cheap: stdlib ``sqlite3``, read-only; Alembic is not imported. A
    database the old migrator left is reported at its ``schema_migrations`` version."""
    _check_sources(sources)
    with _reader(database, busy_timeout) as connection:
        states = [_state(connection, source) for source in sources]
    per_source = {s.source.name: (s.current, s.latest) for s in states}
    main = next((s for s in states if s.source.name == SERVICE.name), states[0] if states else None)
    if main is None:
        return SchemaStatus(0, 0, per_source)
    return SchemaStatus(main.current, main.latest, per_source)


def apply_migrations(
    database: Target,
    busy_timeout: float = 5.0,
    sources: Sequence[MigrationSource] = (SERVICE,),
    *,
    on_failure: FailureHandler | None = None,
) -> list[Migration]:
    """Upgrade each source to its newest script, in the given order (the service
    first); returns the scripts this call applied.

    Under :func:`migration_lock`. When nothing is pending, returns ``[]`` without
    importing Alembic. A failure of the service's source raises
    :class:`MigrationError`; a failure of another source goes to ``on_failure`` and
    the next source is applied, or raises when there is no ``on_failure``."""
    _check_sources(sources)
    applied: list[Migration] = []
    with migration_lock(database, busy_timeout):
        pending: list[_State] = []
        with _reader(database, busy_timeout) as connection:
            for source in sources:
                try:
                    state = _state(connection, source)
                except MigrationError as exc:
                    _failed(source, exc, on_failure)
                    continue
                if state.pending:
                    pending.append(state)
        if not pending:
            return applied
        from . import _alembic_run  # only now: Alembic and SQLAlchemy are heavy

        for state in pending:
            done: list[Migration] = []
            try:
                _alembic_run.migrate(database, busy_timeout, state, state.latest, done)
            except MigrationError as exc:
                _failed(state.source, exc, on_failure)
            finally:
                for migration in done:
                    _log.info("applied migration %s of %r", migration.path.name, migration.source)
                applied.extend(done)
    return applied


def _failed(
    source: MigrationSource, exc: MigrationError, on_failure: FailureHandler | None
) -> None:
    if source.name == SERVICE.name or on_failure is None:
        raise exc
    _log.error("%s", exc)
    on_failure(source, exc)


def migrate_to(
    database: Target, busy_timeout: float, source: MigrationSource, target: int
) -> list[Migration]:
    """Move one source to version ``target`` (0 = before its first script), up or
    down, under the lock; returns the scripts applied or reverted, in that order."""
    return _move(database, busy_timeout, source, target, down_only=False)


def downgrade(
    database: Target, busy_timeout: float, source: MigrationSource, target: int
) -> list[Migration]:
    """Revert one source's scripts down to version ``target`` (0 = base), under the
    lock; returns the reverted scripts, newest first."""
    return _move(database, busy_timeout, source, target, down_only=True)


def _move(
    database: Target, busy_timeout: float, source: MigrationSource, target: int, *, down_only: bool
) -> list[Migration]:
    _check_sources([source])
    with migration_lock(database, busy_timeout):
        with _reader(database, busy_timeout) as connection:
            state = _state(connection, source)
        if not 0 <= target <= state.latest:
            raise MigrationError(
                f"{source.name!r} has versions 0 to {state.latest}; cannot go to {target}"
            )
        if down_only and target > state.current:
            raise MigrationError(
                f"{source.name!r} is at version {state.current}; a downgrade cannot go "
                f"up to {target}"
            )
        if target == state.current and state.adopt is None:
            return []
        from . import _alembic_run  # only now: Alembic and SQLAlchemy are heavy

        done: list[Migration] = []
        try:
            _alembic_run.migrate(database, busy_timeout, state, target, done)
        finally:
            verb = "reverted" if target < state.current else "applied"
            for migration in done:
                _log.info("%s migration %s of %r", verb, migration.path.name, migration.source)
    return done
