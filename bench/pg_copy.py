"""The cost of loading a dataset from PostgreSQL: ``copy_query`` of N rows into a
published SQLite file, against the same copy from a SQLite database.

    python -m bench.pg_copy [--rows 100000] [--repeat 5] [--batch 5000]

A throw-away PostgreSQL server (``tests.support.postgres``: initdb in a temporary
folder, fsync off) holds a table of N rows of about 100 bytes (id, name, weight,
note); a SQLite file holds the same rows. Each copy is timed wall-clock and in CPU
of this process (the loop streaming the cursor plus the pool thread writing the
file; the server's CPU is not counted), and the peak RSS growth is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sqlite3
import tempfile
import time
from pathlib import Path
from statistics import median

from quart_service.data import postgres as pg_backend
from quart_service.data.postgres import PostgresDatabase
from quart_service.data.published import copy_query
from tests.support.postgres import postgres_server

QUERY = "SELECT id, name, weight, note FROM big_rows"
ROWS_SQL = "SELECT n, 'name-' || n, n / 7.0, repeat('x', 64) || n FROM generate_series(1, {rows}) n"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _pg_copies(url: str, folder: Path, repeat: int) -> list[tuple[float, float]]:
    database = PostgresDatabase(url, 5.0)
    timings = []
    try:
        await database.fetchall("SELECT 1")  # the pool is open before the clock starts
        for n in range(repeat):
            wall, cpu = time.perf_counter(), _cpu()
            published = await database.copy_query(QUERY, folder / f"pg-{n}.sqlite", key="id")
            timings.append((time.perf_counter() - wall, _cpu() - cpu))
            assert published.rows > 0
    finally:
        await database.close()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=pg_backend.COPY_BATCH)
    args = parser.parse_args()
    pg_backend.COPY_BATCH = args.batch
    with postgres_server() as server, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server.psql(
            "CREATE TABLE big_rows (id INTEGER PRIMARY KEY, name TEXT, "
            "weight DOUBLE PRECISION, note TEXT); "
            f"INSERT INTO big_rows {ROWS_SQL.format(rows=args.rows)}; ANALYZE big_rows"
        )
        source = folder / "source.sqlite"
        with contextlib.closing(sqlite3.connect(source)) as db:
            db.execute("CREATE TABLE big_rows (id INTEGER PRIMARY KEY, name, weight, note)")
            db.executemany(
                "INSERT INTO big_rows VALUES (?, ?, ?, ?)",
                ((n, f"name-{n}", n / 7.0, "x" * 64 + str(n)) for n in range(1, args.rows + 1)),
            )
            db.commit()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pg = asyncio.run(_pg_copies(server.url(), folder, args.repeat))
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        lite = []
        for n in range(args.repeat):
            wall, cpu = time.perf_counter(), _cpu()
            copy_query(source, 5.0, QUERY, folder / f"lite-{n}.sqlite", "id")
            lite.append((time.perf_counter() - wall, _cpu() - cpu))
        size = (folder / "pg-0.sqlite").stat().st_size
    print(f"copy_query of {args.rows:,} rows (~{size / args.rows:.0f} B each in the file), ")
    print(f"median of {args.repeat}, batch {args.batch}:")
    for name, timings in (("PostgreSQL (asyncpg cursor)", pg), ("SQLite (inside SQLite)", lite)):
        wall = median(t[0] for t in timings)
        cpu = median(t[1] for t in timings)
        print(
            f"  {name:28} {wall * 1000:8.1f} ms wall  {cpu * 1000:8.1f} ms CPU  "
            f"{args.rows / wall:10,.0f} rows/s"
        )
    print(f"  peak RSS growth during the PostgreSQL copies: {rss_growth / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
