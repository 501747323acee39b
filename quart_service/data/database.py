"""What the service asks of a database, whichever engine holds the data.

The data plane, the models repository, the datasets' loaders and the admin API use a
:class:`Database`; two backends implement it:

* :class:`~quart_service.data.sqlite.SQLiteDatabase`: one aiosqlite connection to the
  SQLite file (the default, ``database_url`` empty);
* :class:`~quart_service.data.postgres.PostgresDatabase`: a bounded asyncpg pool
  (``database_url = postgresql://...``), opened on first use.

SQL is written with ``?`` placeholders everywhere; the PostgreSQL backend turns them
into ``$1..$n``. A row supports ``row["col"]``, ``row[0]`` and ``dict(row)``. Lock
waits become :class:`~quart_service.errors.DatabaseBusy` (retry after 1 s), an
unreachable database :class:`~quart_service.errors.DatabaseUnavailable` (5 s). The
data layer (:mod:`quart_service.data.layer`) is the only place that builds one.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..observability.metrics import Counts
from .published import Published

__all__ = [
    "BUSY_RETRY_AFTER",
    "POSTGRES_SCHEMES",
    "UNAVAILABLE_RETRY_AFTER",
    "Database",
    "is_postgres",
    "redact",
]

# Seconds a client is told to wait: a lock passes quickly, a missing file does not.
BUSY_RETRY_AFTER = 1.0
UNAVAILABLE_RETRY_AFTER = 5.0

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(target: Path | str) -> bool:
    """Whether a database target (a SQLite path, or a URL) names PostgreSQL."""
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password (for logs, errors and ``/debug/identity``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Database(abc.ABC):
    """A worker's counted handle on the database; opens its connection(s) on first use."""

    #: ``sqlite`` or ``postgresql``.
    dialect: str
    #: Statements run, by kind (poll, load, startup, read, write); survives a reconnect.
    queries: Counts

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """Whether this worker holds a connection now."""

    @abc.abstractmethod
    async def fetchall(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> list[Any]:
        """Run a query and return all rows; counted under ``kind``."""

    @abc.abstractmethod
    async def fetchone(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> Any | None:
        """Run a query and return its first row, if any."""

    @abc.abstractmethod
    async def execute(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "write"
    ) -> int:
        """Run a statement in autocommit mode; returns the rows it changed."""

    @abc.abstractmethod
    async def copy_query(self, sql: str, path: Path, key: str | None = None) -> Published:
        """Run ``sql`` and write its result to a new published dataset file; counted
        as a ``load``."""

    async def reopen_if_replaced(self) -> None:  # noqa: B027 (a no-op unless a file)
        """Drop the connection if what it points at was replaced (a SQLite file)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection(s); the next query reopens."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Where the data is and whether this worker has it open (no secrets)."""
