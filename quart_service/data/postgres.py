"""The PostgreSQL backend: a bounded asyncpg pool per worker, opened on first use.

Imported only when ``database_url`` names PostgreSQL (install the ``postgres`` extra).
The service writes its SQL with ``?`` placeholders; :func:`translate` turns them into
asyncpg's ``$1..$n``. asyncpg's ``Record`` already reads like the SQLite rows
(``row["col"]``, ``row[0]``, ``dict(row)``).

Three choices keep the database's load what the data plane promises (one statement
per refresh interval while idle):

* the pool is created with ``min_size=0`` and a ``reset`` hook that sends nothing: by
  default asyncpg sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
  RESET ALL`` each time a connection goes back to the pool, which would double the
  statements of every poll. Our statements are autocommit and use no session state
  (advisory locks live on the migrator's own connection), and asyncpg still rolls
  back a transaction left open;
* prepared statements are cached per connection (asyncpg's default), so the markers
  query is parsed once;
* followers never open the pool.

``copy_query`` streams the query's rows with a server-side cursor, in batches, into
:func:`~quart_service.data.published.write_rows`, which runs on the pool thread and
pulls each batch from the loop as it needs it: at most two batches are in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg

from ..errors import DatabaseBusy, DatabaseUnavailable, ServiceError
from ..observability.metrics import Counts
from .database import BUSY_RETRY_AFTER, UNAVAILABLE_RETRY_AFTER, Database, redact
from .published import Published, write_rows

__all__ = ["COPY_BATCH", "PostgresDatabase", "as_service_error", "translate"]

#: Rows fetched per round trip by ``copy_query``.
COPY_BATCH = 5_000


def translate(sql: str) -> str:
    """``?`` placeholders to ``$1..$n``, skipping those inside quoted strings
    (``'...'``), quoted identifiers (``"..."``), comments and dollar-quoted bodies.

    Doubled quotes inside a string (``'it''s'``) stay inside it."""
    out: list[str] = []
    number = 0
    i, n = 0, len(sql)
    while i < n:
        char = sql[i]
        if char in "'\"":
            end = i + 1
            while end < n:
                if sql[end] == char:
                    if end + 1 < n and sql[end + 1] == char:  # doubled: still inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end])
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end])
            i = end
        elif char == "$" and (tag_end := _dollar_tag(sql, i)) is not None:
            tag = sql[i:tag_end]
            end = sql.find(tag, tag_end)
            end = n if end < 0 else end + len(tag)
            out.append(sql[i:end])
            i = end
        elif char == "?":
            number += 1
            out.append(f"${number}")
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _dollar_tag(sql: str, start: int) -> int | None:
    """The end of a ``$tag$`` opening a dollar-quoted string at ``start``, if any
    (``$1`` is a parameter, not a tag)."""
    end = start + 1
    while end < len(sql) and (sql[end].isalnum() or sql[end] == "_"):
        end += 1
    if end < len(sql) and sql[end] == "$" and not sql[start + 1 : end][:1].isdigit():
        return end + 1
    return None


async def _keep_session(_connection: Any) -> None:
    """The pool's reset hook: send nothing (see the module's docstring)."""


class PostgresDatabase(Database):
    """A counted asyncpg pool of at most ``pool_size`` connections."""

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        busy_timeout: float,
        pool_size: int = 4,
        queries: Counts | None = None,
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._busy_timeout = busy_timeout
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self.queries = queries if queries is not None else Counts()
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        """Whether this worker has its pool now."""
        return self._pool is not None

    async def fetchall(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> list[Any]:
        """Run a query and return all rows (``asyncpg.Record``); counted under ``kind``."""
        pool = await self._connect()
        self.queries.inc(kind)
        with _service_errors():
            rows: list[Any] = await pool.fetch(translate(sql), *parameters)
            return rows

    async def fetchone(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "read"
    ) -> Any | None:
        """Run a query and return its first row, if any."""
        pool = await self._connect()
        self.queries.inc(kind)
        with _service_errors():
            return await pool.fetchrow(translate(sql), *parameters)

    async def execute(
        self, sql: str, parameters: Iterable[Any] = (), *, kind: str = "write"
    ) -> int:
        """Run a statement (autocommit); returns the rows it changed."""
        pool = await self._connect()
        self.queries.inc(kind)
        with _service_errors():
            status: str = await pool.execute(translate(sql), *parameters)
        # "INSERT 0 3", "UPDATE 2", "DELETE 0"; DDL says no number ("CREATE TABLE").
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else -1

    async def copy_query(self, sql: str, path: Path, key: str | None = None) -> Published:
        """Stream ``sql``'s rows through a server-side cursor, batch by batch, into a new
        published file (written on the pool thread); counted as one ``load``."""
        pool = await self._connect()
        self.queries.inc("load")
        loop = asyncio.get_running_loop()
        with _service_errors():
            async with pool.acquire() as connection, connection.transaction(readonly=True):
                cursor = await connection.cursor(translate(sql))
                batches = _Batches(cursor, loop)
                try:
                    return await loop.run_in_executor(None, write_rows, path, batches.rows(), key)
                finally:
                    batches.done = True

    async def close(self) -> None:
        """Close the pool (a broken one is terminated); the next query opens a new one."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._connect_timeout)
        except Exception:  # TimeoutError included
            pool.terminate()

    def identity(self) -> dict[str, Any]:
        """The server (password removed), whether the pool is open, its bound."""
        return {
            "url": redact(self.url),
            "open": self.is_open,
            "pool_size": self._pool_size,
        }

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                with _service_errors():
                    self._pool = await asyncpg.create_pool(
                        self.url,
                        min_size=0,
                        max_size=self._pool_size,
                        timeout=self._connect_timeout,
                        reset=_keep_session,
                        server_settings={
                            # The busy_timeout of SQLite: how long to wait for a lock.
                            "lock_timeout": str(int(self._busy_timeout * 1000)),
                            "application_name": "quart_service",
                        },
                    )
            return self._pool


class _Batches:
    """Rows of a cursor, pulled batch by batch from a pool thread (``write_rows``)
    while the cursor itself is driven on the event loop."""

    def __init__(self, cursor: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._cursor = cursor
        self._loop = loop
        self.done = False

    def rows(self) -> Iterator[Mapping[str, Any]]:
        while not self.done:
            future = asyncio.run_coroutine_threadsafe(self._cursor.fetch(COPY_BATCH), self._loop)
            batch = future.result()
            if not batch:
                return
            # Records as they are: write_rows reads row.keys() and row[column].
            yield from batch
            if len(batch) < COPY_BATCH:
                return


@contextlib.contextmanager
def _service_errors() -> Iterator[None]:
    """Turn asyncpg's connection and lock errors into the service's 503 errors."""
    try:
        yield
    except Exception as exc:
        error = as_service_error(exc)
        if error is None:
            raise
        raise error from exc


def as_service_error(exc: BaseException) -> ServiceError | None:
    """The 503 error a client should see for ``exc``, if it is one of those."""
    if isinstance(
        exc,
        asyncpg.LockNotAvailableError
        | asyncpg.SerializationError
        | asyncpg.DeadlockDetectedError
        | asyncpg.TooManyConnectionsError,
    ):
        return DatabaseBusy(
            "The database is locked by another writer; retry.", retry_after=BUSY_RETRY_AFTER
        )
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError  # includes ConnectionDoesNotExistError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | asyncpg.InvalidCatalogNameError  # the database does not exist
        | OSError  # refused, unreachable, reset
        | TimeoutError,
    ) or _lost_connection(exc):
        return DatabaseUnavailable(
            "The database cannot be reached; retry.", retry_after=UNAVAILABLE_RETRY_AFTER
        )
    return None


def _lost_connection(exc: BaseException) -> bool:
    """asyncpg's own "connection is closed" / "pool is closing". asyncpg raises a plain
    ``InterfaceError`` for those and for mistakes in the call too (a wrong number of
    arguments), so the message tells them apart."""
    text = str(exc)
    return type(exc) is asyncpg.InterfaceError and ("is closed" in text or "closing" in text)
