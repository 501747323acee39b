"""A dataset's published copy: one read-only SQLite file per version, shared by mmap.

The refresh leader writes each new version of a dataset to its own file
(``<data_dir>/datasets/<name>/<version>.sqlite``), with an index on the dataset's key,
then publishes the manifest that names it. Every worker opens the file read-only,
``immutable`` (no locks: the file never changes) and memory-mapped, so:

* a swap costs one open, whatever the size (nothing is parsed or copied);
* the pages live once in the kernel's page cache and are shared by every worker
  (``/proc/PID/smaps_rollup`` counts them in Pss shared, not once per worker);
* a request keeps reading the version it started with: the file is only unlinked,
  and an open file outlives its name.

:func:`write_rows` and :func:`copy_query` block: the leader runs them in the pool.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["DatasetView", "Published", "Row", "copy_query", "write_rows"]

T = TypeVar("T")

# The table inside every published file.
_TABLE = "dataset"
# Rows are read through the mmap; a cap keeps the address space sane for huge files.
_MMAP_CAP = 1 << 34

#: A row as a loader gives it: column name to value.
Row = Mapping[str, Any]


class Published:
    """What the leader wrote: the file, its columns and its number of rows."""

    __slots__ = ("columns", "path", "rows")

    def __init__(self, path: Path, columns: Sequence[str], rows: int) -> None:
        self.path = path
        self.columns = tuple(columns)
        self.rows = rows


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[tuple[sqlite3.Connection, Path]]:
    """A fresh database at a temporary name, renamed to ``path`` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    # 0600 from the start: a published copy of the models table holds their secrets.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    connection = sqlite3.connect(tmp, isolation_level=None)
    try:
        # A copy we can always rebuild: no journal, no fsync per page.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        yield connection, tmp
        connection.close()
        os.replace(tmp, path)
    except BaseException:
        connection.close()
        tmp.unlink(missing_ok=True)
        raise


def _index(connection: sqlite3.Connection, schema: str, key: str | None) -> None:
    if key is not None:
        connection.execute(f"CREATE INDEX {schema}.dataset_key ON {_TABLE} ({_quote(key)})")


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]], key: str | None = None) -> Published:
    """Write rows (mappings with the same keys) to a new published file."""
    iterator = iter(rows)
    first = next(iterator, None)
    # keys(), not iteration: an asyncpg Record is a mapping that iterates its values.
    columns: tuple[str, ...] = tuple(first.keys()) if first is not None else ()
    if key is not None and first is not None and key not in columns:
        raise ValueError(f"key column {key!r} is not among the columns {list(columns)}")
    count = 0
    with _new_file(path) as (connection, _tmp):
        names = ", ".join(_quote(c) for c in columns) or "_empty"
        connection.execute(f"CREATE TABLE {_TABLE} ({names})")
        if first is not None:
            marks = ", ".join("?" for _ in columns)
            insert = f"INSERT INTO {_TABLE} VALUES ({marks})"
            connection.execute("BEGIN")
            batch: list[tuple[Any, ...]] = []
            for row in _chain(first, iterator):
                count += 1
                try:
                    batch.append(tuple(row[c] for c in columns))
                except KeyError as exc:
                    raise ValueError(f"row {count} has no column {exc}") from None
                if len(batch) >= 10_000:
                    _insert(connection, insert, batch, count - len(batch))
                    batch.clear()
            _insert(connection, insert, batch, count - len(batch))
            connection.execute("COMMIT")
        _index(connection, "main", key if first is not None else None)
    return Published(path, columns, count)


def _chain(
    first: Mapping[str, Any], rest: Iterator[Mapping[str, Any]]
) -> Iterator[Mapping[str, Any]]:
    yield first
    yield from rest


def _insert(
    connection: sqlite3.Connection, insert: str, batch: list[tuple[Any, ...]], offset: int
) -> None:
    try:
        connection.executemany(insert, batch)
    except sqlite3.ProgrammingError as exc:
        for number, row in enumerate(batch, start=offset + 1):
            bad = [v for v in row if not isinstance(v, (int, float, str, bytes, type(None)))]
            if bad:
                raise ValueError(
                    f"row {number} holds a {type(bad[0]).__name__}: a dataset holds numbers, "
                    "text, bytes or null (encode structures as JSON text)"
                ) from exc
        raise


def copy_query(
    database: Path, busy_timeout: float, query: str, path: Path, key: str | None = None
) -> Published:
    """Run ``query`` on the SQLite database and copy its result into a new published
    file, inside SQLite (no row becomes a Python object)."""
    with _new_file(path) as (connection, _tmp):
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        # mode=rw: never create a missing database. The query's unqualified table names
        # resolve to the attached database (the new file has only the dataset table).
        connection.execute("ATTACH DATABASE ? AS source", (f"file:{database}?mode=rw",))
        try:
            connection.execute(f"CREATE TABLE main.{_TABLE} AS SELECT * FROM ({query})")
        finally:
            connection.execute("DETACH DATABASE source")
        columns = [row[1] for row in connection.execute(f"PRAGMA table_info({_TABLE})")]
        if key is not None and key not in columns:
            raise ValueError(f"key column {key!r} is not among the columns {columns}")
        _index(connection, "main", key)
        (count,) = connection.execute(f"SELECT count(*) FROM {_TABLE}").fetchone()
    return Published(path, columns, int(count))


class DatasetView(Generic[T]):
    """One version of a dataset as this worker reads it: immutable rows, looked up by
    key or iterated, and the object ``build`` made of them (once, on first use).

    Rows are :class:`sqlite3.Row`: read-only, by column name or index (``dict(row)``
    for a dict). Reads run on the calling thread against the memory-mapped file;
    a keyed lookup costs a few microseconds.
    """

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        *,
        columns: Sequence[str],
        rows: int,
        key: str | None,
        loaded_at: float,
        build: Callable[[DatasetView[Any]], T],
        stamp: str = "",
    ) -> None:
        self.name = name
        self.version = version
        # The database revisions of its tables, e.g. "12" or "9.2": the same data has
        # the same stamp on every host (versions are numbered per host).
        self.stamp = stamp or str(version)
        self.path = path
        self.columns = tuple(columns)
        self.key = key
        self.loaded_at = loaded_at
        self._rows = rows
        self._build = build
        self._built: tuple[T] | None = None
        size = os.stat(path).st_size
        # immutable=1: no locking and no change detection; the file never changes.
        self._connection = sqlite3.connect(
            f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        self._connection.execute(f"PRAGMA mmap_size = {min(size, _MMAP_CAP)}")
        self._connection.row_factory = sqlite3.Row
        self.opened_at = time.time()

    def __len__(self) -> int:
        return self._rows

    def __iter__(self) -> Iterator[sqlite3.Row]:
        if not self.columns:
            return iter(())
        return iter(self._connection.execute(f"SELECT * FROM {_TABLE}"))

    def get(self, key: Any, default: Any = None) -> sqlite3.Row | Any:
        """The first row whose key column equals ``key`` (``default`` if none)."""
        if self.key is None:
            raise TypeError(f"dataset {self.name!r} declares no key column")
        if not self.columns:
            return default
        row = self._connection.execute(
            f"SELECT * FROM {_TABLE} WHERE {_quote(self.key)} = ? LIMIT 1", (key,)
        ).fetchone()
        return default if row is None else row

    def select(self, where: str, parameters: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """The rows matching an SQL condition over the columns (for big datasets)."""
        if not self.columns:
            return []
        sql = f"SELECT * FROM {_TABLE} WHERE {where}"
        return list(self._connection.execute(sql, tuple(parameters)))

    @property
    def value(self) -> T:
        """What the dataset's ``build`` made of these rows (built once, here)."""
        if self._built is None:
            self._built = (self._build(self),)
        return self._built[0]

    def close(self) -> None:
        """Release the file (also done when the last reference goes)."""
        self._connection.close()

    def __repr__(self) -> str:
        return f"<DatasetView {self.name} v{self.version} rows={self._rows}>"
