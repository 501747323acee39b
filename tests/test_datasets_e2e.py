"""Datasets under a real Hypercorn with 1 and 4 workers and the real SQLite file (and
a real PostgreSQL server): one statement per interval whatever the number of datasets
and workers, a failing loader isolated to its dataset, and resources rebuilt from a
dataset once per worker."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from quart_service.data.markers import MARKERS_QUERY
from quart_service.data.migrations import apply_migrations

from .apps.datasets import SCHEMA
from .support.data import Backend, wait_all
from .support.server import pinned_workers, running_server, sqlite3_shell

INTERVAL = 0.5
APP = "tests.apps.datasets:app"


def _prepare(root: Path) -> tuple[Path, dict[str, str]]:
    """A migrated database with the app's tables, as an operator would prepare it."""
    data_dir = root / "data"
    database = data_dir / "quart_service.db"
    apply_migrations(database)
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.executescript(SCHEMA)
    trace = root / "trace"
    trace.mkdir()
    env = {
        "QUART_SERVICE_DATA_DIR": str(data_dir),
        "QUART_SERVICE_REFRESH_INTERVAL": str(INTERVAL),
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        "TEST_TRACE_DIR": str(trace),
    }
    return database, env


def _datasets(client: httpx.Client) -> dict[str, Any]:
    found: dict[str, Any] = client.get("/debug/identity").json()["data"]["datasets"]
    return found


def _enabled(flag: str) -> Callable[[dict[str, Any]], bool]:
    return lambda answer: flag in answer["enabled"]


def _statements(trace: Path) -> dict[str, list[str]]:
    """Each worker's traced statements, by log file."""
    return {log.name: log.read_text().splitlines() for log in trace.glob("*.log")}


def _prepare_postgres(root: Path, backend: Backend) -> dict[str, str]:
    """The same on PostgreSQL: migrated, the app's tables created with psql."""
    apply_migrations(backend.target)
    backend.shell(SCHEMA)
    return {
        **backend.env,
        "QUART_SERVICE_REFRESH_INTERVAL": str(INTERVAL),
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
    }


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 4])
def test_five_datasets_cost_one_statement_per_interval(
    tmp_path: Path, workers: int, backend: Backend
) -> None:
    trace = tmp_path / "trace"
    if backend.name == "postgresql":
        env = _prepare_postgres(tmp_path, backend)
    else:
        _database, env = _prepare(tmp_path)

    def statements() -> dict[str, list[str]]:
        if backend.name == "postgresql":
            return {"server log": backend.statements()}
        return _statements(trace)

    with (
        running_server(tmp_path, app=APP, workers=workers, env=env) as server,
        pinned_workers(server, workers) as clients,
    ):
        names = {"models", "flags", "regions", "notes", "limits"}
        wait_all(
            clients,
            "/debug/identity",
            lambda a: names <= {n for n, d in a["data"]["datasets"].items() if d["version"]},
            timeout=15,
        )
        time.sleep(2 * INTERVAL)  # start-up statements (schema, markers, loads) are done
        before = {name: len(lines) for name, lines in statements().items()}
        window = 10 * INTERVAL
        time.sleep(window)
        quiet = [
            statement
            for name, lines in statements().items()
            for statement in lines[before.get(name, 0) :]
        ]
    polls = window / INTERVAL
    # Every statement the database saw in the window is the one markers query, about
    # once per interval: not once per worker, not once per dataset. On PostgreSQL
    # counted in the server's own statement log.
    assert set(quiet) == {MARKERS_QUERY}, set(quiet)
    assert polls - 1.5 <= len(quiet) <= polls + 1.5, (len(quiet), polls)


@pytest.mark.slow
def test_a_failing_loader_keeps_its_version_while_others_move(tmp_path: Path) -> None:
    database, env = _prepare(tmp_path)
    with (
        running_server(tmp_path, app=APP, workers=4, env=env) as server,
        pinned_workers(server, 4) as clients,
    ):
        wait_all(clients, "/ds/limits", lambda a: a["rows"] == [{"tenant": "acme", "rpm": 60}], 15)
        limits_version = next(iter(clients.values())).get("/ds/limits").json()["version"]
        sqlite3_shell(
            database,
            "UPDATE control SET mode = 'fail'; UPDATE tenant_limits SET rpm = 120",
        )
        wait_all(clients, "/debug/identity",
                 lambda a: a["data"]["datasets"]["limits"]["stale"], timeout=10)  # fmt: skip
        for client in clients.values():
            stale = _datasets(client)["limits"]
            assert stale["error"] == "RuntimeError: limits service said no"
            assert stale["version"] == limits_version
            ready = client.get("/readyz")
            # Not a required dataset: the worker stays ready, and names it.
            assert ready.status_code == 200
            assert ready.json()["checks"]["data"]["stale_datasets"] == ["limits"]
            # The last good version is still served.
            assert client.get("/ds/limits").json()["rows"] == [{"tenant": "acme", "rpm": 60}]
        # Meanwhile another dataset's change still arrives everywhere.
        sqlite3_shell(database, "INSERT INTO flags VALUES ('gamma', 1)")
        wait_all(clients, "/ds/flags",
                 lambda a: {"name": "gamma", "enabled": 1} in a["rows"], timeout=10)  # fmt: skip
        # The loader recovers without a restart: the new rows, no longer stale.
        sqlite3_shell(database, "UPDATE control SET mode = 'ok'")
        wait_all(clients, "/ds/limits",
                 lambda a: a["rows"] == [{"tenant": "acme", "rpm": 120}], timeout=10)  # fmt: skip
        for client in clients.values():
            assert not _datasets(client)["limits"]["stale"]
            assert client.get("/readyz").json()["checks"]["data"]["stale_datasets"] == []


@pytest.mark.slow
def test_a_resource_built_from_a_dataset_is_rebuilt_once_per_worker(tmp_path: Path) -> None:
    database, env = _prepare(tmp_path)
    # Each change is made just after a refresh, so it waits about one whole interval:
    # a short one keeps the 5 changes and the quiet window after them short.
    interval = INTERVAL / 2
    env["QUART_SERVICE_REFRESH_INTERVAL"] = str(interval)
    with (
        running_server(tmp_path, app=APP, workers=4, env=env) as server,
        pinned_workers(server, 4) as clients,
    ):
        wait_all(clients, "/flag-book", lambda a: a["enabled"] == ["beta"], timeout=15)
        changes = 5
        for n in range(changes):
            flag = f"f{n}"
            sqlite3_shell(database, f"INSERT INTO flags VALUES ('{flag}', 1)")
            wait_all(clients, "/flag-book", _enabled(flag), 10)

        def builds() -> dict[int, int]:
            found = {}
            for pid, client in clients.items():
                statuses = client.get("/debug/identity").json()["resources"]
                found[pid] = next(s["builds"] for s in statuses if s["name"] == "flag_book")
            return found

        time.sleep(3 * interval)  # a late, second rebuild would show by now
        assert builds() == dict.fromkeys(clients, 1 + changes)
        # Values cached under the flags' version are never served after a swap: the
        # book every worker serves is built from the version its requests see.
        for client in clients.values():
            assert (
                client.get("/flag-book").json()["version"]
                == (client.get("/ds/flags").json()["version"])
            )
