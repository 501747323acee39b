"""Per-table revision markers: one row per watched table, moved by triggers.

Every table a dataset names gets a row in ``table_revisions`` and three triggers
(insert, update, delete) that add one to its revision. Any writer moves them (the
admin API, another service, the ``sqlite3`` shell), so the refresh leader learns what
changed by reading every marker in one statement::

    SELECT table_name, revision FROM table_revisions

The triggers are installed once, under the migration lock, for the tables the
declared datasets name (``CREATE TRIGGER IF NOT EXISTS``: installing twice is a
no-op). The functions here block (stdlib ``sqlite3``, or ``psycopg``): run them in
the pool.

On PostgreSQL each table has one statement-level trigger ``qs_revision_<table>``
(``AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT``) calling
the plpgsql function ``qs_bump_revision()``, which bumps the row named by
``TG_TABLE_NAME``: one bump per statement, however many rows it touched (a statement
that touches none bumps it too; the leader then reloads a dataset that did not
change, which is harmless). :func:`watch_tables` takes the database target (a SQLite
path or a ``postgresql://`` URL) and picks the dialect.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterable
from typing import Any

from .database import is_postgres
from .migrations import Target, migration_lock, pg_connect

__all__ = [
    "MARKERS_QUERY",
    "install_markers",
    "missing_markers",
    "trigger_names",
    "watch_tables",
]

MARKERS_QUERY = "SELECT table_name, revision FROM table_revisions"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_EVENTS = ("insert", "update", "delete")


def trigger_names(table: str, dialect: str = "sqlite") -> list[str]:
    """The names of the triggers that watch ``table``: three on SQLite, one on
    PostgreSQL."""
    if dialect == "postgresql":
        return [f"qs_revision_{table}"]
    return [f"qs_revision_{table}_{event}" for event in _EVENTS]


# The same function as migration 0003 creates (it may have been dropped and the
# markers reinstalled since: CREATE OR REPLACE keeps this idempotent).
_PG_BUMP_FUNCTION = """
CREATE OR REPLACE FUNCTION qs_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE table_revisions SET revision = revision + 1 WHERE table_name = TG_TABLE_NAME;
    RETURN NULL;
END
$$
"""

# One read: the marker rows and the installed qs_ triggers ('%%' is one '%' for psycopg
# with parameters, and the same pattern without).
_PG_INSTALLED = """
SELECT 'row', table_name FROM table_revisions
UNION ALL
SELECT 'trigger', tgname FROM pg_trigger
WHERE NOT tgisinternal AND tgname LIKE 'qs\\_revision\\_%%'
"""


def _check(table: str) -> str:
    if not _IDENTIFIER.match(table):
        raise ValueError(f"table name {table!r} is not a plain SQL identifier (letters, digits, _)")
    return table


def missing_markers(connection: Any, tables: Iterable[str]) -> list[str]:
    """The tables among ``tables`` whose marker row or triggers are not installed
    (``connection``: a stdlib ``sqlite3`` or a ``psycopg`` connection)."""
    wanted = {_check(table) for table in tables}
    if not wanted:
        return []
    if not isinstance(connection, sqlite3.Connection):
        return _pg_missing(connection, wanted)
    installed = {
        row[0]
        for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    }
    has_table = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'table_revisions'"
    ).fetchone()
    rows = (
        {row[0] for row in connection.execute("SELECT table_name FROM table_revisions")}
        if has_table
        else set()
    )
    return sorted(
        table for table in wanted if table not in rows or not set(trigger_names(table)) <= installed
    )


def _pg_missing(connection: Any, wanted: set[str]) -> list[str]:
    try:
        found = connection.execute(_PG_INSTALLED).fetchall()
    except Exception as exc:  # psycopg's UndefinedTable: table_revisions is not there
        if getattr(exc, "sqlstate", None) != "42P01":
            raise
        found = []
    rows = {name for kind, name in found if kind == "row"}
    installed = {name for kind, name in found if kind == "trigger"}
    return sorted(
        table
        for table in wanted
        if table not in rows or not set(trigger_names(table, "postgresql")) <= installed
    )


def install_markers(connection: Any, tables: Iterable[str]) -> dict[str, str]:
    """Install the marker row and triggers of each table; returns ``{table: error}``
    for the tables that could not be watched (a table that does not exist, say).

    Each table is installed in its own transaction: one missing table does not stop
    the others from being watched."""
    if not isinstance(connection, sqlite3.Connection):
        return _pg_install(connection, tables)
    errors: dict[str, str] = {}
    for table in sorted({_check(table) for table in tables}):
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "INSERT OR IGNORE INTO table_revisions (table_name, revision) VALUES (?, 0)",
                (table,),
            )
            for event, name in zip(_EVENTS, trigger_names(table), strict=True):
                # The name was checked above: it is a plain identifier.
                connection.execute(
                    f'CREATE TRIGGER IF NOT EXISTS "{name}" AFTER {event.upper()} ON "{table}" '
                    "BEGIN UPDATE table_revisions SET revision = revision + 1 "
                    f"WHERE table_name = '{table}'; END"
                )
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            errors[table] = f"{type(exc).__name__}: {exc}"
    return errors


def _pg_install(connection: Any, tables: Iterable[str]) -> dict[str, str]:
    """PostgreSQL: the function, then per table (one transaction each) its row and
    its statement-level trigger."""
    errors: dict[str, str] = {}
    for table in sorted({_check(table) for table in tables}):
        try:
            with connection.transaction():
                connection.execute(_PG_BUMP_FUNCTION)
                connection.execute(
                    "INSERT INTO table_revisions (table_name, revision) VALUES (%s, 0) "
                    "ON CONFLICT (table_name) DO NOTHING",
                    (table,),
                )
                (name,) = trigger_names(table, "postgresql")
                # Checked above: plain identifiers.
                connection.execute(
                    f'CREATE OR REPLACE TRIGGER "{name}" AFTER INSERT OR UPDATE OR DELETE '
                    f'OR TRUNCATE ON "{table}" FOR EACH STATEMENT '
                    "EXECUTE FUNCTION qs_bump_revision()"
                )
        except Exception as exc:  # psycopg.Error: the table is missing, say
            errors[table] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return errors


def watch_tables(
    database: Target, busy_timeout: float, tables: Iterable[str], *, install: bool = True
) -> dict[str, str]:
    """Make sure every table in ``tables`` has its marker; returns ``{table: why not}``.

    The usual case (all installed) costs one read and no lock. Missing ones are
    installed under the migration lock, or only reported when ``install`` is false
    (the workers must not change the schema)."""
    wanted = set(tables)
    connection: Any
    if is_postgres(database):
        assert isinstance(database, str)
        connection = pg_connect(database, busy_timeout)
    else:
        connection = sqlite3.connect(database, timeout=busy_timeout, isolation_level=None)
    with contextlib.closing(connection):
        missing = missing_markers(connection, wanted)
        if not missing:
            return {}
        if not install:
            why = "no revision triggers: run quart-service migrate (auto_migrate is off)"
            return dict.fromkeys(missing, why)
        with migration_lock(database, busy_timeout):
            return install_markers(connection, missing)
