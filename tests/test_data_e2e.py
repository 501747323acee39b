"""The data plane under real Hypercorn workers, a real SQLite file and the sqlite3 shell."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from quart_service.data.migrations import discover

from .conftest import read_events
from .support.data import Backend, put_model, wait_all
from .support.server import (
    ROOT,
    pinned_workers,
    running_server,
    server_env,
    sqlite3_shell,
    wait_for,
)

INTERVAL = 0.5
WINDOW = 10 * INTERVAL  # an observation window of 10 refresh intervals
_AI_APP = "quart_service.app:app"


def _env(data_dir: Path, events: Path | None = None, **extra: str) -> dict[str, str]:
    env = {
        "QUART_SERVICE_DATA_DIR": str(data_dir),
        "QUART_SERVICE_REFRESH_INTERVAL": str(INTERVAL),
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        **extra,
    }
    if events is not None:
        env["TEST_EVENTS_FILE"] = str(events)
    return env


def _identities(clients: dict[int, httpx.Client]) -> dict[int, dict[str, Any]]:
    identities = {pid: c.get("/debug/identity").json() for pid, c in clients.items()}
    for pid, identity in identities.items():
        assert identity["pid"] == pid, "a pinned connection moved to another worker"
    return identities


def test_four_workers_on_an_empty_database_migrate_once_and_become_ready(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    with (
        running_server(tmp_path, workers=4, env=_env(data_dir)) as server,
        pinned_workers(server, 4) as clients,
    ):
        # "ready" is exactly the 200 answer (503 + "not_ready" otherwise).
        wait_all(clients, "/readyz", lambda a: a["status"] == "ready", timeout=10)
        for client in clients.values():
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
        identities = _identities(clients)
    scripts = discover()
    applied = {pid: i["data"]["migrations_applied"] for pid, i in identities.items()}
    assert sum(applied.values()) == len(scripts)  # each revision once, by one worker
    (applier,) = [pid for pid, count in applied.items() if count]
    with contextlib.closing(sqlite3.connect(data_dir / "quart_service.db")) as db:
        versions = db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(f"{len(scripts):04d}",)]
    # The log names each revision once, from the worker that applied them all.
    log = server.log()
    for script in scripts:
        lines = [
            line
            for line in log.splitlines()
            if f"applied migration {script.path.name} of 'service'" in line
        ]
        assert len(lines) == 1, lines
        assert f"[{applier}]" in lines[0]


@pytest.mark.slow
def test_database_queries_do_not_grow_with_the_worker_count(
    tmp_path: Path, backend: Backend
) -> None:
    env = {**_env(backend.data_dir), **backend.env}
    with (
        running_server(tmp_path, workers=4, env=env) as server,
        pinned_workers(server, 4) as clients,
    ):
        before = _identities(clients)
        # An observation window on purpose, not a wait: count the queries that four
        # idle workers make in 10 refresh intervals (the bounds below are computed
        # from it), as the markers tests of test_datasets_e2e and test_cluster_e2e do.
        time.sleep(WINDOW)
        after = _identities(clients)
    leaders = [pid for pid, i in after.items() if i["data"]["role"] == "leader"]
    assert len(leaders) == 1

    def polls(identity: dict[str, Any]) -> int:
        return int(identity["data"]["queries"].get("poll", 0))

    for pid in after:
        if pid not in leaders:
            assert polls(after[pid]) == 0, f"follower {pid} queried the database"
    # Only the leader polls: one small query per interval for the whole host.
    leader_polls = polls(after[leaders[0]]) - polls(before[leaders[0]])
    assert WINDOW / INTERVAL * 0.7 <= leader_polls <= WINDOW / INTERVAL + 2
    total_after = sum(sum(i["data"]["queries"].values()) for i in after.values())
    total_before = sum(sum(i["data"]["queries"].values()) for i in before.values())
    assert total_after - total_before == leader_polls


@pytest.mark.slow
def test_a_change_from_the_sqlite3_shell_reaches_every_worker(
    tmp_path: Path, backend: Backend
) -> None:
    """The sqlite3 shell, or psql on PostgreSQL (where the four workers also migrate
    the empty database under the advisory lock)."""
    # Each change is made just after a refresh, so it waits about one whole interval: a
    # short one keeps the 5 changes short. The bound is still the interval + 0.5 s.
    interval = INTERVAL / 2
    env = {
        **_env(backend.data_dir, QUART_SERVICE_REFRESH_INTERVAL=str(interval)),
        **backend.env,
    }
    with (
        running_server(tmp_path, workers=4, env=env) as server,
        pinned_workers(server, 4) as clients,
    ):
        delays: list[float] = []
        for n in range(5):
            expected = {"v": n}
            put_model(backend, "m", expected)

            def arrived(answer: dict[str, Any], expected: dict[str, int] = expected) -> bool:
                return bool(answer["models"].get("m") == expected)

            reached = wait_all(clients, "/data", arrived, timeout=5)
            delays.append(max(reached.values()))
    # Visible in every worker within refresh_interval + 0.5 s.
    assert max(delays) <= interval + 0.5, delays


@pytest.mark.slow
def test_cache_loads_once_per_worker_and_never_serves_an_old_generation(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    events = tmp_path / "events.jsonl"
    database = data_dir / "quart_service.db"
    with (
        running_server(tmp_path, workers=2, env=_env(data_dir, events)) as server,
        pinned_workers(server, 2) as clients,
    ):
        put_model(database, "k", {"v": "old"})
        wait_all(clients, "/data", lambda a: "k" in a["models"], timeout=5)

        async def burst() -> list[dict[str, Any]]:
            # 500 requests at once, each on a connection of its own, from 10 clients of
            # 50 connections: one httpx client spends CPU per request that grows with
            # its pool (~20 ms each with 500 connections), so from one client the
            # burst took 10 s and reached the workers spread over those 10 s, mostly
            # after the first load had finished; ten clients send it within ~1.5 s.
            async with contextlib.AsyncExitStack() as stack:
                limits = httpx.Limits(max_connections=50)
                senders = [
                    await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=60))
                    for _ in range(10)
                ]
                answers = await asyncio.gather(
                    *(senders[n % 10].get(server.url + "/cached/k") for n in range(500))
                )
            return [a.json() for a in answers]

        answers = asyncio.run(burst())
        assert {a["value"] for a in answers} == {"old"}
        loads = Counter(e["pid"] for e in read_events(events) if e["kind"] == "loaded")
        answered = {a["pid"] for a in answers}
        # 500 concurrent misses: the loader ran once in each worker that answered.
        assert loads == Counter(dict.fromkeys(answered, 1))

        put_model(database, "k", {"v": "new"})
        wait_all(clients, "/data", lambda a: a["models"]["k"] == {"v": "new"}, timeout=5)
        for client in clients.values():
            for _ in range(20):
                assert client.get("/cached/k").json()["value"] == "new"


def _move(database: Path, to: Path) -> None:
    # Fold the WAL into the main file first, so moving the file moves all the data.
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.replace(database, to)


@pytest.mark.slow
def test_database_gone_for_ten_seconds_serves_last_snapshot_then_recovers(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    database = data_dir / "quart_service.db"
    away = data_dir / "away.db"
    env = _env(data_dir, QUART_SERVICE_SNAPSHOT_MAX_STALENESS="2")
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        pinned_workers(server, 2) as clients,
    ):
        put_model(database, "a", {"v": 1})
        wait_all(clients, "/data", lambda a: "a" in a["models"], timeout=5)
        _move(database, away)
        try:
            assert _wait_stale_while_serving(clients, 10.0), "stale was not reported"
            put_model(away, "a", {"v": 2})
        finally:
            _move(away, database)
        wait_all(clients, "/data", lambda a: a["models"]["a"] == {"v": 2}, timeout=10)
        wait_all(clients, "/readyz", lambda a: a["status"] == "ready", timeout=10)


def _hold_write_lock(database: Path, model: str) -> subprocess.Popen[str]:
    """Another process takes the write lock, inserts ``model``, prints ``locked`` once it
    holds the lock, and holds it until :func:`_release` (at most 60 s), then commits.
    The test decides how long the lock is held: its observation window, no longer."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import select, sqlite3, sys\n"
            f"c = sqlite3.connect({str(database)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            f"c.execute(\"INSERT INTO models (name, engine) VALUES ('{model}', 'local')\")\n"
            "print('locked', flush=True)\n"
            "select.select([sys.stdin], [], [], 60)\n"  # until stdin is closed
            "c.execute('COMMIT')\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _release(holder: subprocess.Popen[str]) -> None:
    """Let the lock holder commit now and wait until it has."""
    if holder.stdin is not None:
        holder.stdin.close()
    holder.wait(timeout=30)
    if holder.stdout is not None:
        holder.stdout.close()


@pytest.mark.slow
def test_a_writer_holding_an_exclusive_lock_does_not_stop_reads(tmp_path: Path) -> None:
    """WAL: readers are not blocked by a writer, so the refresh carries on."""
    data_dir = tmp_path / "data"
    database = data_dir / "quart_service.db"
    with (
        running_server(tmp_path, workers=2, env=_env(data_dir)) as server,
        pinned_workers(server, 2) as clients,
    ):
        holder = _hold_write_lock(database, "held")
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "locked"
            # An observation window on purpose: reads keep working for 20 rounds, 0.2 s
            # apart (at least 4 s, several refresh intervals), while the lock is held.
            for _ in range(20):
                for client in clients.values():
                    assert client.get("/data").status_code == 200
                    assert client.get("/readyz").status_code == 200
                time.sleep(0.2)
        finally:
            _release(holder)
        wait_all(clients, "/data", lambda a: "held" in a["models"], timeout=5)


def _elector(data_dir: Path, events: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.apps.elector", str(data_dir), str(INTERVAL), str(events)],
        cwd=ROOT,
        env=server_env(),
    )


def test_leader_failover_after_kill_9(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    events = tmp_path / "events.jsonl"
    processes = [_elector(data_dir, events) for _ in range(3)]
    try:

        def leaders() -> list[int]:
            current: dict[int, str] = {}
            for event in read_events(events):
                if event["kind"] == "role":
                    current[event["pid"]] = event["role"]
            alive = {p.pid for p in processes if p.poll() is None}
            return [pid for pid, role in current.items() if role == "leader" and pid in alive]

        def one_leader() -> list[int]:
            current = leaders()
            return current if len(current) == 1 else []

        (first,) = wait_for(one_leader, "exactly one of the 3 electors is leader", 15)
        os.kill(first, signal.SIGKILL)
        killed_at = time.time()
        next(p for p in processes if p.pid == first).wait(timeout=5)
        # The take-over time is measured from the events' timestamps, not by this poll.
        (second,) = wait_for(leaders, f"a new leader after kill -9 of {first}", 5)
        assert second != first
        took_over = next(
            e["t"]
            for e in read_events(events)
            if e["kind"] == "role" and e["pid"] == second and e["role"] == "leader"
        )
        assert took_over - killed_at <= 2 * INTERVAL
        # Refreshes continue: a change is published by the new leader.
        sqlite3_shell(
            data_dir / "quart_service.db",
            "INSERT INTO models (name, engine) VALUES ('after-failover', 'local')",
        )

        def published() -> bool:
            manifest = json.loads((data_dir / "snapshot.json").read_text())
            models = data_dir / manifest["datasets"]["models"]["file"]
            with contextlib.closing(sqlite3.connect(models)) as db:
                return (
                    db.execute("SELECT 1 FROM dataset WHERE name = 'after-failover'").fetchone()
                    is not None
                )

        assert wait_for(published, "the new leader published the change to the models file", 5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_stale_while_serving(clients: dict[int, httpx.Client], seconds: float) -> bool:
    """Requests keep succeeding from the last snapshot for ``seconds``; True if every
    worker's /readyz reported the data stale meanwhile.

    ``seconds`` is an observation window on purpose, not a wait: the database stays
    away for all of it (the tests' scenario), and every answer in it is checked."""
    stale: set[int] = set()
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for pid, client in clients.items():
            answer = client.get("/data")
            assert answer.status_code == 200
            assert answer.json()["models"]["a"] == {"v": 1}
            ready = client.get("/readyz")
            if ready.status_code == 503 and ready.json()["checks"]["data"]["stale"]:
                assert any("data is stale" in p for p in ready.json()["problems"])
                stale.add(pid)
        time.sleep(0.2)
    return stale == set(clients)


@pytest.mark.slow
def test_a_database_locked_by_another_writer_for_ten_seconds(tmp_path: Path) -> None:
    """WAL keeps readers going while another process holds the write lock for 10 s:
    reads and the refresh carry on, a write through the admin API gets 503
    database_busy with Retry-After (not a 500), and succeeds once the lock is gone."""
    data_dir = tmp_path / "data"
    database = data_dir / "quart_service.db"
    env = _env(
        data_dir,
        QUART_SERVICE_DATABASE_BUSY_TIMEOUT="0.3",
        QUART_SERVICE_ADMIN_TOKEN="t0ken",
    )
    auth = {"Authorization": "Bearer t0ken"}
    model = {"name": "written", "engine": "local", "parameters": {}}
    with (
        running_server(tmp_path, app=_AI_APP, workers=2, env=env) as server,
        pinned_workers(server, 2) as clients,
    ):
        holder = _hold_write_lock(database, "locker")
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "locked"
            locked_at = time.monotonic()
            busy = 0
            # An observation window on purpose: the lock is held for these ten seconds
            # (released right after, in `finally`), and every round in it is checked.
            while time.monotonic() - locked_at < 10:
                for client in clients.values():
                    assert client.get("/v1/models").status_code == 200
                    assert client.get("/readyz").status_code == 200
                refused = httpx.post(server.url + "/admin/models", json=model, headers=auth)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "database_busy"
                assert refused.headers["retry-after"] == "1"
                busy += 1
            assert busy >= 3
        finally:
            _release(holder)
        created = httpx.post(server.url + "/admin/models", json=model, headers=auth)
        assert created.status_code == 201

        def both_seen(answer: dict[str, Any]) -> bool:
            return {"locker", "written"} <= {m["id"] for m in answer["data"]}

        wait_all(clients, "/v1/models", both_seen, timeout=10)
        assert "Traceback" not in server.log()


@pytest.mark.slow
def test_a_deleted_database_file_is_survived_until_it_is_restored(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    database = data_dir / "quart_service.db"
    backup = tmp_path / "backup.db"
    env = _env(data_dir, QUART_SERVICE_SNAPSHOT_MAX_STALENESS="2")
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        pinned_workers(server, 2) as clients,
    ):
        put_model(database, "a", {"v": 1})
        wait_all(clients, "/data", lambda a: "a" in a["models"], timeout=5)
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.execute(f"VACUUM INTO '{backup}'")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{database}{suffix}")
        assert _wait_stale_while_serving(clients, 5.0), "stale was not reported"
        assert not database.exists(), "the service must not create an empty database"
        put_model(backup, "restored", {"v": 3})
        os.replace(backup, database)  # the operator restores the file
        wait_all(clients, "/data", lambda a: "restored" in a["models"], timeout=10)
        wait_all(clients, "/readyz", lambda a: a["status"] == "ready", timeout=10)
        assert server.process.poll() is None
