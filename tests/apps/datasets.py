"""A test app with five datasets (the models and four of its own), for the e2e tests.

Its tables are created by the test before the server starts (``SCHEMA``). When
``TEST_TRACE_DIR`` is set, every SQLite connection this worker opens to the service's
database gets a trace callback (stdlib ``sqlite3``'s ``set_trace_callback``, installed by
wrapping ``sqlite3.connect`` before anything connects) that appends each statement to
``<TEST_TRACE_DIR>/<pid>.log``: the database's own view of what it was asked,
independent of the service's counters. Reads of the published dataset files (opened
``immutable``) are not the database and are not traced.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from quart import Blueprint

from quart_service import Database, Dataset, Resource, create_app, dataset, resources

TRACE_DIR = os.environ.get("TEST_TRACE_DIR", "")

SCHEMA = """
CREATE TABLE flags (name TEXT PRIMARY KEY, enabled INTEGER NOT NULL);
CREATE TABLE regions (code TEXT PRIMARY KEY, label TEXT NOT NULL);
CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE tenant_limits (tenant TEXT PRIMARY KEY, rpm INTEGER NOT NULL);
CREATE TABLE control (id INTEGER PRIMARY KEY CHECK (id = 1), mode TEXT NOT NULL);
INSERT INTO control VALUES (1, 'ok');
INSERT INTO flags VALUES ('beta', 1);
INSERT INTO tenant_limits VALUES ('acme', 60);
"""


def _traced_connect(connect: Any) -> Any:
    def traced(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection: sqlite3.Connection = connect(database, *args, **kwargs)
        if "immutable=1" not in str(database):
            log = Path(TRACE_DIR) / f"{os.getpid()}.log"

            def trace(statement: str) -> None:
                with log.open("a", encoding="utf-8") as handle:
                    handle.write(" ".join(statement.split()) + "\n")

            connection.set_trace_callback(trace)
        return connection

    return traced


if TRACE_DIR:
    sqlite3.connect = _traced_connect(sqlite3.connect)


async def load_limits(database: Database) -> list[dict[str, Any]]:
    """A loader (not a query): fails while ``control.mode`` is ``fail``."""
    mode = await database.fetchone("SELECT mode FROM control", kind="load")
    if mode is not None and mode["mode"] == "fail":
        raise RuntimeError("limits service said no")
    rows = await database.fetchall("SELECT tenant, rpm FROM tenant_limits", kind="load")
    return [dict(row) for row in rows]


FLAGS = Dataset("flags", tables=["flags"], query="SELECT name, enabled FROM flags", key="name")
REGIONS = Dataset(
    "regions", tables=["regions"], query="SELECT code, label FROM regions", key="code"
)
NOTES = Dataset("notes", tables=["notes"], query="SELECT id, body FROM notes", key="id")
LIMITS = Dataset("limits", tables=["tenant_limits", "control"], loader=load_limits, key="tenant")


class FlagBook:
    """A singleton built from the flags dataset (rebuilt when it changes)."""

    def __init__(self, version: int, enabled: set[str]) -> None:
        self.version = version
        self.enabled = enabled
        self.built_at = time.time()


async def build_flag_book() -> FlagBook:
    flags = await dataset(FLAGS)
    return FlagBook(flags.version, {row["name"] for row in flags if row["enabled"]})


FLAG_BOOK = Resource("flag_book", build_flag_book, datasets=[FLAGS])

bp = Blueprint("datasets_app", __name__)


@bp.get("/ds/<name>")
async def rows(name: str) -> dict[str, Any]:
    """This worker's version of a dataset, with its rows."""
    view = await dataset(name)
    return {"pid": os.getpid(), "version": view.version, "rows": [dict(r) for r in view]}


@bp.get("/flag-book")
async def flag_book() -> dict[str, Any]:
    book = await resources().get(FLAG_BOOK)
    return {"pid": os.getpid(), "version": book.version, "enabled": sorted(book.enabled)}


app = create_app(datasets=[FLAGS, REGIONS, NOTES, LIMITS], resources=[FLAG_BOOK], blueprints=[bp])
