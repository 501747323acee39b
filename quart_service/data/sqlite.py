"""The SQLite backend: this worker's one aiosqlite connection, opened on first use,
every statement counted, SQLite's lock and file errors turned into the service's 503
errors.

aiosqlite runs one thread per connection (https://github.com/omnilib/aiosqlite/issues/2),
so each worker keeps exactly one. Workers that only follow the leader's snapshot never open
it at all. The handle is built once per worker by the data layer and passed to whoever
queries (the refresh plane, the models repository); nobody fetches it back through
the resource registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import DatabaseBusy, DatabaseUnavailable, ServiceError
from ..observability.metrics import Counts
from .database import BUSY_RETRY_AFTER, UNAVAILABLE_RETRY_AFTER, Database
from .published import Published, copy_query

__all__ = ["SQLiteDatabase", "private_database"]

_log = logging.getLogger("quart_service.data")

# SQLite's companions of a database file: its WAL, the WAL's index, the rollback journal.
_COMPANIONS = ("-wal", "-shm", "-journal")


def private_database(path: Path, *, create: bool = False) -> None:
    """Keep the SQLite file readable by this user only (0600): it holds the models'
    parameters, secrets included (an upstream's ``api_key``).

    ``create``: make the file, empty (a valid empty database), with mode 0600 before
    SQLite opens it, so no other user can open it even for a moment; SQLite then gives
    its ``-wal``, ``-shm`` and ``-journal`` files the database file's mode. A file
    made by an older version (0644) is tightened, with its companions; a file this
    user does not own is left as it is, with a warning."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return  # new and empty: no companions yet
    for candidate in [path, *(path.with_name(path.name + s) for s in _COMPANIONS)]:
        try:
            mode = stat.S_IMODE(os.stat(candidate).st_mode)
            if mode & 0o077:
                os.chmod(candidate, mode & 0o700)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            _log.warning("cannot make %s private (mode 0600): %s", candidate, exc)


class SQLiteDatabase(Database):
    """A counted, lazily opened ``aiosqlite`` connection to one file."""

    dialect = "sqlite"

    def __init__(self, path: Path, busy_timeout: float, queries: Counts | None = None) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        # By kind (poll, load, startup, read, write): owned here, so the counts
        # survive a reconnect.
        self.queries = queries if queries is not None else Counts()
        self._connection: aiosqlite.Connection | None = None
        self._file: tuple[int, int] | None = None
        # The open in flight, shared by every caller that needs the connection meanwhile.
        self._opening: asyncio.Task[aiosqlite.Connection] | None = None

    @property
    def is_open(self) -> bool:
        """Whether this worker holds a connection now."""
        return self._connection is not None

    async def fetchall(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> list[aiosqlite.Row]:
        """Run a query and return all rows; counted under ``kind``."""
        connection = await self._connect()
        self.queries.inc(kind)
        with _service_errors():
            async with connection.execute(sql, tuple(parameters)) as cursor:
                return list(await cursor.fetchall())

    async def fetchone(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> aiosqlite.Row | None:
        """Run a query and return its first row, if any."""
        connection = await self._connect()
        self.queries.inc(kind)
        with _service_errors():
            async with connection.execute(sql, tuple(parameters)) as cursor:
                row: aiosqlite.Row | None = await cursor.fetchone()
                return row

    async def execute(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "write"
    ) -> int:
        """Run a statement in autocommit mode; returns the rows it changed."""
        connection = await self._connect()
        self.queries.inc(kind)
        with _service_errors():
            async with connection.execute(sql, tuple(parameters)) as cursor:
                return cursor.rowcount

    async def copy_query(self, sql: str, path: Path, key: str | None = None) -> Published:
        """Run ``sql`` and write its result to a new published dataset file, inside
        SQLite and on the pool (a big result never becomes Python objects); counted
        as a ``load``."""
        self.queries.inc("load")
        loop = asyncio.get_running_loop()
        with _service_errors():
            return await loop.run_in_executor(
                None, copy_query, self.path, self._busy_timeout, sql, path, key
            )

    async def reopen_if_replaced(self) -> None:
        """Close the connection if its file was replaced or deleted since it was opened
        (a connection never sees the new file, e.g. after a restore); the next query
        opens the file that is there now."""
        if self._connection is None:
            return
        try:
            current: tuple[int, int] | None = _file_identity(self.path)
        except OSError:
            current = None
        if current != self._file:
            await self.close()

    async def close(self) -> None:
        """Close the connection (and stop its thread); the next query reopens it. An open
        still in flight is waited for first, then closed with the rest."""
        if self._opening is not None:
            # wait(), not gather(): a close that is itself cancelled must not cancel the open.
            await asyncio.wait({self._opening})
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def identity(self) -> dict[str, Any]:
        """The file, whether it is open here, and the statements this worker ran."""
        return {"path": str(self.path), "open": self.is_open}

    async def _connect(self) -> aiosqlite.Connection:
        if self._connection is not None:
            return self._connection
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open_and_keep())
        # Shielded: a caller cancelled while the file opens (a client gone, the refresh
        # task stopped at shutdown) must not cancel aiosqlite's connect. Cancelled, aiosqlite
        # leaves its thread to hand the result to this loop later, and if the loop has
        # closed by then, the thread dies with "Event loop is closed". Kept instead, the
        # connection serves the next query, and close() waits for it.
        with _service_errors():
            return await asyncio.shield(self._opening)

    async def _open_and_keep(self) -> aiosqlite.Connection:
        try:
            self._connection = await self._open()
            return self._connection
        finally:
            self._opening = None

    async def _open(self) -> aiosqlite.Connection:
        # mode=rw: a missing file is an error, not a new empty database.
        await asyncio.get_running_loop().run_in_executor(None, private_database, self.path)
        connection = await aiosqlite.connect(
            f"file:{self.path}?mode=rw", uri=True, timeout=self._busy_timeout, isolation_level=None
        )
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA foreign_keys=ON")
            self._file = _file_identity(self.path)
        except BaseException:
            await connection.close()
            raise
        connection.row_factory = aiosqlite.Row
        return connection


def _file_identity(path: Path) -> tuple[int, int]:
    """(device, inode) of the file; raises if it is gone."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


@contextlib.contextmanager
def _service_errors() -> Iterator[None]:
    """Turn SQLite's lock and file errors into the service's 503 errors."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        error = _as_service_error(exc)
        if error is None:
            raise
        raise error from exc


def _as_service_error(exc: sqlite3.OperationalError) -> ServiceError | None:
    """The 503 error a client should see for ``exc``, if it is one of those."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return DatabaseBusy(
            "The database is locked by another writer; retry.", retry_after=BUSY_RETRY_AFTER
        )
    if "unable to open" in text or "disk i/o" in text or "readonly" in text:
        return DatabaseUnavailable(
            "The database cannot be reached; retry.", retry_after=UNAVAILABLE_RETRY_AFTER
        )
    return None
