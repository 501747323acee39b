"""Alembic driven from code, for :mod:`quart_service.data.migrations`.

The only module of the service that imports Alembic and SQLAlchemy (0.24 s and 36 MB
per process): ``migrations`` imports it when a source has something to apply, under
the migration lock. There is no ``env.py`` and no ``alembic.ini``: a source is just
a folder of revision scripts, so this module does what ``alembic.command.upgrade``
and a stock online ``env.py`` do together (``EnvironmentContext`` with the revision
function, ``configure``, ``run_migrations``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, Engine, create_engine, event, exc, make_url
from sqlalchemy.pool import NullPool

from ..errors import MigrationError
from .database import is_postgres
from .migrations import Migration, Target
from .sqlite import private_database

if TYPE_CHECKING:
    from .migrations import _State

__all__ = ["migrate"]


def _engine(database: Target, busy_timeout: float) -> Engine:
    """A SQLAlchemy engine on which DDL is transactional.

    PostgreSQL: DDL is transactional as it is. The driver is psycopg 3, synchronous:
    the migrator runs in a pool thread or the CLI, where a blocking driver is the
    plain fit (SQLAlchemy's asyncpg dialect would need an event loop in that thread
    and ``run_sync`` around every Alembic call), and the same driver reads the version
    tables and installs the markers without SQLAlchemy. The service's requests still
    go through asyncpg (:mod:`quart_service.data.postgres`).

    SQLite:
    sqlite3's legacy transaction control (Python < 3.12, and the default up to
    3.15) neither begins a transaction before DDL, so a failed revision would leave
    its CREATE TABLEs behind. SQLAlchemy's recipe: turn sqlite3's own BEGIN off
    (``isolation_level = None``) and emit BEGIN from the ``begin`` event,
    https://docs.sqlalchemy.org/en/21/dialects/sqlite.html#sqlite-enabling-transactions
    (in the 2.1 source: lib/sqlalchemy/dialects/sqlite/base.py, "Enabling Non-Legacy
    SQLite Transactional Modes"). ``BEGIN IMMEDIATE`` rather than a plain BEGIN: the
    write lock is taken up front, so a revision that reads before it writes cannot
    fail with SQLITE_BUSY when a worker commits meanwhile (WAL mode).
    """
    if is_postgres(database):
        assert isinstance(database, str)
        url = make_url(database).set(drivername="postgresql+psycopg")
        return create_engine(
            url,
            poolclass=NullPool,
            connect_args={
                "options": f"-c lock_timeout={int(busy_timeout * 1000)}",
                "connect_timeout": max(1, int(busy_timeout)),
                "application_name": "quart_service migrate",
            },
        )
    database = Path(database)
    database.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 before SQLite opens it (its WAL and shm files take that mode).
    private_database(database, create=True)
    engine = create_engine(
        URL.create("sqlite", database=str(database)),
        connect_args={"timeout": busy_timeout},
        poolclass=NullPool,
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _revision(version: int) -> str:
    return "base" if version == 0 else f"{version:04d}"


def _reason(error: BaseException) -> str:
    """One line: ``OperationalError: no such table: x`` (the driver's error when
    SQLAlchemy wraps one, without its SQL and background link)."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        error = error.orig
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def migrate(
    database: Target, busy_timeout: float, state: _State, target: int, done: list[Migration]
) -> None:
    """Move ``state.source`` from ``state.current`` to ``target``, one transaction per
    revision, appending each script run (applied, or reverted) to ``done`` as its
    transaction commits. A failing revision is rolled back and raises
    :class:`MigrationError` naming it; ``done`` then holds those committed before."""
    source, by_number = state.source, {m.version: m for m in state.migrations}
    upgrade = target >= state.current
    destination = _revision(target)
    script = ScriptDirectory(str(source.directory), version_locations=[str(source.directory)])
    start = len(done)

    def record(
        ctx: MigrationContext,
        step: MigrationInfo,
        heads: Collection[Any],
        run_args: Mapping[str, Any],
    ) -> None:
        # Alembic calls it with these keywords after each revision's step.
        if not step.is_stamp and step.up_revision_id is not None:
            done.append(by_number[int(step.up_revision_id)])

    def steps(heads: Any, _context: MigrationContext) -> Any:
        # What alembic.command.upgrade / downgrade hand to the environment (their
        # revision functions call these two methods of the script directory).
        if upgrade:
            return script._upgrade_revs(destination, heads)
        return script._downgrade_revs(destination, heads)

    engine = _engine(database, busy_timeout)
    try:
        with engine.connect() as connection:
            if state.adopt is not None:
                _adopt(connection, script, state)
            environment = EnvironmentContext(
                Config(), script, fn=steps, destination_rev=destination
            )
            with environment:
                environment.configure(
                    connection=connection,
                    version_table=source.version_table,
                    transaction_per_migration=True,
                    transactional_ddl=True,
                    on_version_apply=record,
                )
                try:
                    with environment.begin_transaction():
                        environment.run_migrations()
                except Exception as error:  # a script raises whatever it raises
                    # Where the rollback left the database (the callback also runs for
                    # a revision whose COMMIT then fails); by count if it cannot say.
                    ran = len(done) - start
                    counted = state.current + ran if upgrade else state.current - ran
                    now = _version_after_failure(environment, counted)
                    del done[start + abs(now - state.current) :]
                    failing = now + 1 if upgrade else now
                    name = by_number[failing].path.name if failing in by_number else "?"
                    verb = "failed" if upgrade else "failed to revert"
                    raise MigrationError(
                        f"migration {name} of {source.name!r} {verb} and was rolled back: "
                        f"{_reason(error)}"
                    ) from error
    finally:
        engine.dispose()


def _version_after_failure(environment: EnvironmentContext, counted: int) -> int:
    try:
        revision = environment.get_context().get_current_revision()
    except Exception:  # the connection itself broke: trust the count
        return counted
    return 0 if revision is None else int(revision)


def _adopt(connection: Connection, script: ScriptDirectory, state: _State) -> None:
    """A database the SQL-file migrator left: stamp its last version first."""
    assert state.adopt is not None
    if state.adopt not in {m.version for m in state.migrations}:
        raise MigrationError(
            f"schema_migrations says version {state.adopt}, but {state.source.name!r} has "
            f"no script {state.adopt:04d}: cannot adopt this database"
        )
    try:
        context = MigrationContext.configure(
            connection, opts={"version_table": state.source.version_table}
        )
        with connection.begin():
            context.stamp(script, _revision(state.adopt))
    except Exception as error:  # SQLAlchemy's or Alembic's
        raise MigrationError(
            f"adopting the schema_migrations database at version {state.adopt} failed: "
            f"{_reason(error)}"
        ) from error
