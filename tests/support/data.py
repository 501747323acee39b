"""Helpers for data-plane tests and benches: change rows, watch every worker, and
run the same test on either database backend."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .postgres import PostgresServer
from .server import sqlite3_shell


@dataclass
class Backend:
    """Where a test server's data lives (SQLite in its data folder, or a PostgreSQL
    database), and the operator's shell for it (``sqlite3`` or ``psql``)."""

    name: str
    data_dir: Path
    url: str = ""
    postgres: PostgresServer | None = None

    @property
    def target(self) -> Path | str:
        """What the migrator and the markers take: the SQLite file or the URL."""
        return self.url or self.data_dir / "quart_service.db"

    @property
    def env(self) -> dict[str, str]:
        """The server's settings for this backend."""
        env = {"QUART_SERVICE_DATA_DIR": str(self.data_dir)}
        if self.url:
            env["QUART_SERVICE_DATABASE_URL"] = self.url
        return env

    def shell(self, sql: str) -> None:
        """Run SQL the way an operator would: the sqlite3 shell, or psql."""
        if self.postgres is not None:
            self.postgres.psql(sql, database=self.url.rsplit("/", 1)[1])
        else:
            sqlite3_shell(self.data_dir / "quart_service.db", sql)

    def scalar(self, sql: str) -> str:
        """The first column of the first row of a query, as text."""
        if self.postgres is not None:
            return self.postgres.psql(sql, database=self.url.rsplit("/", 1)[1]).split("\n")[0]
        with contextlib.closing(sqlite3.connect(self.data_dir / "quart_service.db")) as db:
            return str(db.execute(sql).fetchone()[0])

    def statements(self) -> list[str]:
        """PostgreSQL: every statement the service's connections sent, from the
        server's own log (``log_statement=all``), in order."""
        assert self.postgres is not None
        found = []
        for line in self.postgres.log_lines():
            match = _LOGGED.search(line)
            if match:
                found.append(" ".join(match.group(1).split()))
        return found


# "... [pid] quart_service: LOG:  execute __asyncpg_stmt_1__: SELECT ..." or "statement: ..."
_LOGGED = re.compile(r"\] quart_service: LOG:  (?:statement|execute [^:]*): (.*)$")


def put_model_sql(name: str, parameters: dict[str, Any]) -> str:
    """Insert or update a model row: SQL that SQLite and PostgreSQL both take."""
    params = json.dumps(parameters).replace("'", "''")
    return (
        f"INSERT INTO models (name, engine, parameters) VALUES ('{name}', 'local', '{params}') "
        "ON CONFLICT (name) DO UPDATE SET parameters = excluded.parameters"
    )


def put_model(database: Path | Backend, name: str, parameters: dict[str, Any]) -> None:
    """Insert or update a model row with the sqlite3 shell (or psql), as an operator
    would."""
    if isinstance(database, Backend):
        database.shell(put_model_sql(name, parameters))
    else:
        sqlite3_shell(database, put_model_sql(name, parameters))


def wait_all(
    clients: dict[int, httpx.Client],
    path: str,
    done: Callable[[Any], bool],
    timeout: float,
) -> dict[int, float]:
    """Poll every worker until ``done(answer)``; seconds until each one got there."""
    started = time.monotonic()
    reached: dict[int, float] = {}
    while len(reached) < len(clients) and time.monotonic() - started < timeout:
        for pid, client in clients.items():
            if pid not in reached and done(client.get(path).json()):
                reached[pid] = time.monotonic() - started
        time.sleep(0.005)
    if len(reached) < len(clients):
        raise AssertionError(
            f"{path}: only workers {sorted(reached)} of {sorted(clients)} met the condition "
            f"within {timeout} s"
        )
    return reached
