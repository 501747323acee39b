"""This process's one SQLite connection (aiosqlite), with every query counted.

aiosqlite runs one thread per connection (DESIGN.md pitfall 5), so each worker keeps
exactly one, as a resource of the registry: opened on first use, closed at shutdown.
Workers that only follow the leader's snapshot never open it at all.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite

__all__ = ["Database"]


class Database:
    """A thin, counted wrapper over one ``aiosqlite.Connection``."""

    def __init__(self, connection: aiosqlite.Connection, path: Path, queries: Counter[str]) -> None:
        self._connection = connection
        self.path = path
        # Which file this connection reads: a file replaced or deleted under an open
        # connection is never seen again through it, so the owner compares this.
        st = os.stat(path)
        self.identity = (st.st_dev, st.st_ino)
        # By kind (poll, load, read, write); owned by the caller so the counts survive
        # a reconnect.
        self.queries = queries

    @classmethod
    async def open(cls, path: Path, busy_timeout: float, queries: Counter[str]) -> Database:
        """Open ``path`` in WAL mode with a busy timeout (the file must exist)."""
        # mode=rw: a missing file is an error, not a new empty database.
        connection = await aiosqlite.connect(
            f"file:{path}?mode=rw", uri=True, timeout=busy_timeout, isolation_level=None
        )
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            await connection.close()
            raise
        connection.row_factory = aiosqlite.Row
        return cls(connection, path, queries)

    async def fetchall(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> list[aiosqlite.Row]:
        """Run a query and return all rows; counted under ``kind``."""
        self.queries[kind] += 1
        async with self._connection.execute(sql, tuple(parameters)) as cursor:
            return list(await cursor.fetchall())

    async def fetchone(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> aiosqlite.Row | None:
        """Run a query and return its first row, if any."""
        self.queries[kind] += 1
        async with self._connection.execute(sql, tuple(parameters)) as cursor:
            row: aiosqlite.Row | None = await cursor.fetchone()
            return row

    async def execute(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "write"
    ) -> int:
        """Run a statement in autocommit mode; returns the rows it changed."""
        self.queries[kind] += 1
        async with self._connection.execute(sql, tuple(parameters)) as cursor:
            return cursor.rowcount

    async def close(self) -> None:
        """Close the connection and stop its thread."""
        await self._connection.close()
