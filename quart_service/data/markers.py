"""Per-table revision markers: one row per watched table, moved by triggers.

Every table a dataset names gets a row in ``table_revisions`` and three triggers
(insert, update, delete) that add one to its revision. Any writer moves them (the
admin API, another service, the ``sqlite3`` shell), so the refresh leader learns what
changed by reading every marker in one statement::

    SELECT table_name, revision FROM table_revisions

The triggers are installed once, under the migration lock, for the tables the
declared datasets name (``CREATE TRIGGER IF NOT EXISTS``: installing twice is a
no-op). The functions here block (stdlib ``sqlite3``): run them in the pool.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from .migrations import migration_lock

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


def trigger_names(table: str) -> list[str]:
    """The names of the three triggers that watch ``table``."""
    return [f"qs_revision_{table}_{event}" for event in _EVENTS]


def _check(table: str) -> str:
    if not _IDENTIFIER.match(table):
        raise ValueError(f"table name {table!r} is not a plain SQL identifier (letters, digits, _)")
    return table


def missing_markers(connection: sqlite3.Connection, tables: Iterable[str]) -> list[str]:
    """The tables among ``tables`` whose marker row or triggers are not installed."""
    wanted = {_check(table) for table in tables}
    if not wanted:
        return []
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


def install_markers(connection: sqlite3.Connection, tables: Iterable[str]) -> dict[str, str]:
    """Install the marker row and triggers of each table; returns ``{table: error}``
    for the tables that could not be watched (a table that does not exist, say).

    Each table is installed in its own transaction: one missing table does not stop
    the others from being watched."""
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


def watch_tables(
    database: Path, busy_timeout: float, tables: Iterable[str], *, install: bool = True
) -> dict[str, str]:
    """Make sure every table in ``tables`` has its marker; returns ``{table: why not}``.

    The usual case (all installed) costs one read and no lock. Missing ones are
    installed under the migration lock, or only reported when ``install`` is false
    (the workers must not change the schema)."""
    wanted = set(tables)
    connection = sqlite3.connect(database, timeout=busy_timeout, isolation_level=None)
    with contextlib.closing(connection):
        missing = missing_markers(connection, wanted)
        if not missing:
            return {}
        if not install:
            why = "no revision triggers: run quart-service migrate (auto_migrate is off)"
            return dict.fromkeys(missing, why)
        with migration_lock(database):
            return install_markers(connection, missing)
