"""Every documented metric family moves by a known amount, summed over real workers.

docs/operations.md lists the families; tests/test_metrics_e2e.py asserts the request
counts, latencies and basic stream counts. Here every other family is moved through
the HTTP API of a real Hypercorn (or ``quart-service serve``) with 2 worker processes,
and ``/metrics`` (answered by any worker, summed over all of them) must show exactly
what the requests made: counters as the difference between a scrape before and a
scrape after a known sequence, gauges as their value while a known load is held.

Sampled gauges (in progress, pool load, leader, generations, resource states, worker
threads and memory) are set by the answering worker at the scrape and by every other
worker once a second, so they are polled until they show the expected value (with a
deadline), never read after a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.data import put_model, wait_all
from tests.support.server import Server, pinned_workers, running_server, wait_for

T = TypeVar("T")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# A new connection per request, so the requests spread over the workers.
CLOSE = {"Connection": "close"}
QUIET = {"QUART_SERVICE_ACCESS_LOG": "0"}

STREAMS_OPENED = "quart_service_streams_opened_total"
STREAM_ENDS = "quart_service_stream_ends_total"
STREAM_EVENTS = "quart_service_stream_events_total"
STREAM_WRITES = "quart_service_stream_writes_total"
HEARTBEATS = "quart_service_stream_heartbeats_total"
STREAMS_ACTIVE = "quart_service_streams_active"
# Stream counts reach the metrics at the worker's next stream clock tick (<= 0.25 s).
STREAM_TICK = 0.35
IN_PROGRESS = "quart_service_http_requests_in_progress"
REQUESTS = "quart_service_http_requests_total"
BUSY = "quart_service_executor_busy"
QUEUED = "quart_service_executor_queued"
SHED = "quart_service_shed_requests_total"
RESOURCE_STATE = "quart_service_resource_state"
QUERIES = "quart_service_database_queries_total"
WORKER_THREADS = "quart_service_worker_threads"
WORKER_MEMORY = "quart_service_worker_resident_memory_bytes"
RESTARTS = "quart_service_worker_restarts_total"


# -- reading /metrics ---------------------------------------------------------------------


def _samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _series(samples: Samples, name: str) -> dict[int, float]:
    """A ``pid``-labelled gauge (one series per live worker) as {pid: value}."""
    return {
        int(dict(labels)["pid"]): value
        for (sample, labels), value in samples.items()
        if sample == name
    }


def _delta(after: Samples, before: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _scrape(server: Server, client: httpx.Client | None = None) -> Samples:
    """``/metrics`` on ``client``'s connection, or on a new one."""
    if client is not None:
        response = client.get("/metrics")
    else:
        response = httpx.get(server.url + "/metrics", headers=CLOSE, timeout=30)
    assert response.status_code == 200, response.text
    return _samples(response.text)


def _until(
    server: Server,
    observe: Callable[[Samples], T],
    expected: T,
    what: str,
    *,
    timeout: float = 10.0,
    client: httpx.Client | None = None,
) -> Samples:
    """Scrape until ``observe(samples) == expected`` (a sampled gauge catches up, a
    disconnect is noticed); the samples that matched. Fails with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(server, client)
        seen = observe(samples)
        if seen == expected:
            return samples
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: expected {expected!r}, last saw {seen!r}")
        time.sleep(0.05)


# -- requests -------------------------------------------------------------------------------


def _get_text(server: Server, path: str) -> str:
    response = httpx.get(server.url + path, headers=CLOSE, timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def _open_stream(server: Server, path: str) -> socket.socket:
    """A raw connection with a streaming GET on it, once its first event arrived."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed {path} before its first event: {received!r}"
        received += chunk
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before {marker!r}: {received[-300:]!r}"
        received += chunk
    return received


def _abort(sock: socket.socket) -> None:
    """Close as a client that goes away does: at once (RST), unread data and all."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _pinned(
    server: Server, stack: contextlib.ExitStack, per_worker: int
) -> dict[int, list[httpx.Client]]:
    """``per_worker`` keep-alive connections to each of 2 workers, by worker pid."""
    connections: dict[int, list[httpx.Client]] = {}
    for _ in range(per_worker):
        for pid, client in stack.enter_context(pinned_workers(server, 2)).items():
            connections.setdefault(pid, []).append(client)
    return connections


def _usage_of(response: httpx.Response) -> int:
    """``usage.completion_tokens`` of an answer, whole or streamed (the usage chunk)."""
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        tokens: int = response.json()["usage"]["completion_tokens"]
        return tokens
    usages = [
        chunk["usage"]
        for line in response.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
        for chunk in [json.loads(line.removeprefix("data: "))]
        if chunk.get("usage")
    ]
    assert len(usages) == 1, response.text
    streamed: int = usages[0]["completion_tokens"]
    return streamed


# -- streams ----------------------------------------------------------------------------


@pytest.mark.slow
def test_stream_families_move_by_what_the_clients_received(tmp_path: Path) -> None:
    env = {
        **QUIET,
        "QUART_SERVICE_STREAM_HEARTBEAT": "0.4",
        "QUART_SERVICE_STREAM_IDLE_TIMEOUT": "1.5",
    }
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as scraper,
        ThreadPoolExecutor(8) as pool,
    ):
        # Slowly paced events (0.15 s apart): each one leaves in its own write, and no
        # heartbeat is due (0.4 s without a write).
        before = _scrape(server, scraper)
        bodies = list(
            pool.map(lambda _: _get_text(server, "/demo/stream?count=5&interval=0.15"), range(4))
        )
        time.sleep(STREAM_TICK)
        paced = _delta(_scrape(server, scraper), before)
        assert [body.count("data: ") for body in bodies] == [5] * 4

        # Quiet streams: heartbeats while silent (every 0.4 s: 2 in 1 s, 3 before the
        # idle timeout at 1.5 s; a stalled loop may send fewer, so what counts is what
        # the clients received); past the idle timeout, an error event.
        before = _scrape(server, scraper)
        completing = [pool.submit(_get_text, server, "/quiet-stream?quiet=1") for _ in range(3)]
        idle = [pool.submit(_get_text, server, "/quiet-stream?quiet=5") for _ in range(2)]
        quiet_bodies = [future.result() for future in [*completing, *idle]]
        time.sleep(STREAM_TICK)
        quiet = _delta(_scrape(server, scraper), before)
        for future in completing:
            assert "data: second" in future.result()
        for future in idle:
            assert "stream_idle_timeout" in future.result()
            assert "data: second" not in future.result()
        received_heartbeats = sum(body.count(": keep-alive") for body in quiet_bodies)
        assert received_heartbeats > 0, quiet_bodies

        # A producer that raises: its stream ends with an error event.
        before = _scrape(server, scraper)
        failed = [_get_text(server, "/failing-stream") for _ in range(2)]
        time.sleep(STREAM_TICK)
        failing = _delta(_scrape(server, scraper), before)
        for body in failed:
            assert "data: before" in body
            assert "stream_failed" in body

        # Open streams are active and in progress; clients that leave are noticed.
        before = _scrape(server, scraper)
        sockets = [_open_stream(server, "/async-stream?delay=0.05") for _ in range(3)]
        # In progress: the 3 streams and the scrape itself (the answering worker
        # samples at the scrape; the other worker's sample is at most 1 s old).
        _until(
            server,
            lambda s: (_value(s, STREAMS_ACTIVE), _value(s, IN_PROGRESS)),
            (3.0, 4.0),
            "streams active, requests in progress with 3 streams open",
            client=scraper,
        )
        for sock in sockets:
            _abort(sock)
        left = _delta(
            _until(
                server,
                lambda s: (
                    _value(_delta(s, before), STREAM_ENDS, reason="disconnected"),
                    _value(s, STREAMS_ACTIVE),
                    _value(s, IN_PROGRESS),
                ),
                (3.0, 0.0, 1.0),
                "streams ended as disconnected after their clients left",
                client=scraper,
            ),
            before,
        )

    assert _value(paced, STREAMS_OPENED) == 4
    assert _value(paced, STREAM_EVENTS) == 20
    assert _value(paced, STREAM_WRITES) == 20
    assert _value(paced, HEARTBEATS) == 0
    assert _value(paced, STREAM_ENDS, reason="completed") == 4

    assert _value(quiet, STREAMS_OPENED) == 5
    assert _value(quiet, HEARTBEATS) == received_heartbeats
    assert _value(quiet, STREAM_EVENTS) == 3 * 2 + 2 * 1
    assert _value(quiet, STREAM_ENDS, reason="completed") == 3
    assert _value(quiet, STREAM_ENDS, reason="idle_timeout") == 2
    # Heartbeats and the final error frame are control frames, not event writes;
    # the documentation does not say whether they count as writes, so no assertion.

    assert _value(failing, STREAMS_OPENED) == 2
    assert _value(failing, STREAM_EVENTS) == 2
    assert _value(failing, STREAM_ENDS, reason="error") == 2
    assert _value(failing, STREAM_ENDS, reason="completed") == 0

    assert _value(left, STREAMS_OPENED) == 3
    assert _value(left, STREAM_ENDS, reason="disconnected") == 3
    assert _value(left, STREAM_ENDS, reason="completed") == 0


# -- the pool, shedding, resources, worker gauges --------------------------------------------


@pytest.mark.slow
def test_pool_load_shedding_and_resource_states_under_a_held_load(tmp_path: Path) -> None:
    # 4 threads + 1 queued job per worker; a resource's waiting callers are bounded by
    # the queue size too (1). The 'slow' resource takes 4 s to create.
    env = {
        **QUIET,
        "QUART_SERVICE_EXECUTOR_THREADS": "4",
        "QUART_SERVICE_EXECUTOR_QUEUE": "1",
        "QUART_SERVICE_STREAM_TOTAL_TIMEOUT": "1",
        "TEST_SLOW_CREATE_SECONDS": "4",
    }
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        contextlib.ExitStack() as stack,
        ThreadPoolExecutor(24) as pool,
    ):
        connections = _pinned(server, stack, per_worker=9)
        a, b = sorted(connections)
        on_a, on_b = connections[a], connections[b]
        scraper_a = on_a[8]  # worker a samples its gauges at every scrape on this one

        before = _until(
            server,
            lambda s: (
                _value(s, RESOURCE_STATE, resource="slow", state="not_created"),
                _value(s, RESOURCE_STATE, resource="slow", state="ready"),
                _value(s, RESOURCE_STATE, resource="model0", state="not_created"),
                _value(s, BUSY),
                _value(s, QUEUED),
            ),
            (2.0, 0.0, 2.0, 0.0, 0.0),
            "nothing created, nothing running yet",
        )
        assert _value(before, "quart_service_executor_threads") == 2 * 4

        # A stream past its total limit (async: it takes no pool thread).
        total = pool.submit(_get_text, server, "/async-stream?delay=0.1")
        # Hold every thread: 4 blocking views on a, 4 calls of model0 (limit 4) on b;
        # and start creating 'slow' on a.
        held: list[Future[httpx.Response]] = [
            *(pool.submit(on_a[i].get, "/block?ms=4000") for i in range(4)),
            *(pool.submit(on_b[i].get, "/model/0?ms=4000") for i in range(4)),
        ]
        creating = pool.submit(on_a[4].get, "/slow")
        _until(server, lambda s: _value(s, BUSY), 8.0, "8 pool threads busy", client=scraper_a)
        # Now 3 more of each at once: on a, one is queued and two are refused (pool
        # and queue full); on b, one waits for model0 and two are refused (limit
        # reached, 1 caller waiting already).
        more_a = [pool.submit(on_a[i].get, "/block?ms=1") for i in (5, 6, 7)]
        more_b = [pool.submit(on_b[i].get, "/model/0?ms=1") for i in (4, 5, 6)]
        loaded = _until(
            server,
            lambda s: (
                _value(_delta(s, before), SHED, reason="executor_full"),
                _value(_delta(s, before), SHED, reason="resource_busy"),
                _value(s, BUSY),
                _value(s, QUEUED),
                _value(s, RESOURCE_STATE, resource="slow", state="creating"),
                _value(s, RESOURCE_STATE, resource="slow", state="not_created"),
            ),
            (2.0, 2.0, 8.0, 1.0, 1.0, 1.0),
            "2 + 2 requests shed, 8 jobs running, 1 queued, 'slow' creating in one worker",
            client=scraper_a,
        )

        held_statuses = [future.result().status_code for future in held]
        a_answers = [future.result() for future in more_a]
        b_answers = [future.result() for future in more_b]
        assert creating.result().json()["pid"] == a
        total_body = total.result()
        time.sleep(STREAM_TICK)

        after = _until(
            server,
            lambda s: (
                _value(s, BUSY),
                _value(s, QUEUED),
                _value(s, RESOURCE_STATE, resource="slow", state="ready"),
                _value(s, RESOURCE_STATE, resource="slow", state="creating"),
                _value(s, RESOURCE_STATE, resource="slow", state="not_created"),
                _value(s, RESOURCE_STATE, resource="model0", state="ready"),
                _value(s, RESOURCE_STATE, resource="model0", state="not_created"),
                _value(s, RESOURCE_STATE, resource="model1", state="not_created"),
            ),
            (0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 2.0),
            "pool idle; 'slow' and model0 ready in the one worker that used each",
        )
        live = set(server.worker_pids())

    assert held_statuses == [200] * 8
    shed_a = [r for r in a_answers if r.status_code == 503]
    shed_b = [r for r in b_answers if r.status_code == 503]
    assert sorted(r.status_code for r in a_answers) == [200, 503, 503]
    assert sorted(r.status_code for r in b_answers) == [200, 503, 503]
    for response in [*shed_a, *shed_b]:
        assert response.json()["error"]["code"] == "overloaded"
        assert response.headers["retry-after"] == "1"
    assert all("thread pool is full" in r.json()["error"]["message"] for r in shed_a)
    assert all("'model0' is at its limit" in r.json()["error"]["message"] for r in shed_b)
    assert "stream_total_timeout" in total_body

    shed = _delta(after, before)
    assert _value(shed, SHED, reason="executor_full") == len(shed_a) == 2
    assert _value(shed, SHED, reason="resource_busy") == len(shed_b) == 2
    assert _value(shed, STREAM_ENDS, reason="total_timeout") == 1
    assert _value(loaded, RESOURCE_STATE, resource="slow", state="ready") == 0

    # One series per live worker, with plausible values.
    threads, memory = _series(after, WORKER_THREADS), _series(after, WORKER_MEMORY)
    assert set(threads) == set(memory) == live == {a, b}
    for pid in live:
        assert 2 <= threads[pid] <= 4 + 64, threads
        assert 20 * 2**20 <= memory[pid] <= 4 * 2**30, memory


# -- the data plane, the cache, the AI API, database queries -----------------------------------

TOKEN = "metrics-test-token"
INTERVAL = 0.2


def _move_database(database: Path, to: Path) -> None:
    # Fold the WAL into the main file first, so moving the file moves all the data.
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.replace(database, to)


@pytest.mark.slow
def test_data_plane_cache_and_ai_families_move_by_the_changes_and_requests_made(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    database = data_dir / "quart_service.db"
    env = {
        **QUIET,
        "QUART_SERVICE_DATA_DIR": str(data_dir),
        "QUART_SERVICE_REFRESH_INTERVAL": str(INTERVAL),
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
    }
    admin = {"Authorization": f"Bearer {TOKEN}", **CLOSE}
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        pinned_workers(server, 2) as clients,
    ):
        a, b = sorted(clients)
        wait_all(clients, "/data", lambda answer: answer["generation"] >= 1, timeout=10)
        start = _until(server, lambda s: _value(s, "quart_service_leader"), 1.0, "one leader")
        # Elected once since the server started (a counter from zero: no baseline).
        assert _value(start, "quart_service_leader_changes_total") == 1
        generation = clients[a].get("/data").json()["generation"]
        assert clients[b].get("/data").json()["generation"] == generation

        before = _scrape(server)
        began = time.monotonic()
        # Three changes, each awaited in every worker: two with the sqlite3 shell, one
        # through the admin API (one INSERT).
        for n in range(2):
            change = {"v": n}
            put_model(database, "k", change)

            def arrived(answer: dict[str, Any], expected: dict[str, int] = change) -> bool:
                return bool(answer["models"].get("k") == expected)

            wait_all(clients, "/data", arrived, timeout=10)
        created = httpx.post(
            server.url + "/admin/models",
            json={"name": "adm", "engine": "local", "parameters": {"order": 2}},
            headers=admin,
        )
        assert created.status_code == 201, created.text
        wait_all(clients, "/data", lambda answer: "adm" in answer["models"], timeout=10)
        generations = {
            pid: client.get("/data").json()["generation"] for pid, client in clients.items()
        }
        assert generations == {a: generation + 3, b: generation + 3}

        # The cache: a miss loads once per worker and key, then hits; a failed load
        # caches nothing.
        for _ in range(3):
            assert clients[a].get("/cached/k").json()["value"] == 1
        for _ in range(2):
            assert clients[b].get("/cached/k").json()["value"] == 1
        assert clients[b].get("/cached/absent").json()["value"] is None
        for _ in range(2):
            assert clients[a].get("/cached-error/x").status_code == 500

        # The AI API: whole and streamed answers, chat and text, several lengths.
        chat = {"model": "local-ngram", "messages": [{"role": "user", "content": "We the People"}]}
        text = {"model": "local-ngram", "prompt": "Four score and seven"}
        usage = {"stream": True, "stream_options": {"include_usage": True}}
        calls = [
            ("/v1/chat/completions", {**chat, "max_tokens": 7, "seed": 1}),
            ("/v1/completions", {**text, "max_tokens": 12, "seed": 2}),
            ("/v1/chat/completions", {**chat, "max_tokens": 9, "seed": 3, **usage}),
            ("/v1/completions", {**text, "max_tokens": 20, "seed": 4, "stop": ["."], **usage}),
            ("/v1/chat/completions", {**chat, "max_completion_tokens": 3, "seed": 5, **usage}),
        ]
        tokens = [
            _usage_of(httpx.post(server.url + path, json=body, headers=CLOSE, timeout=30))
            for path, body in calls
        ]

        after = _until(
            server,
            lambda s: _series(s, "quart_service_snapshot_generation"),
            {a: float(generation + 3), b: float(generation + 3)},
            "each worker's generation, one series per worker",
        )
        elapsed = time.monotonic() - began
        moved = _delta(after, before)

        # The leader loses the database for a moment: failing, then recovered.
        away = data_dir / "away.db"
        _move_database(database, away)
        failing = _until(
            server,
            lambda s: (
                _value(s, "quart_service_refresh_failing"),
                _value(_delta(s, after), "quart_service_refresh_failures_total") >= 1,
            ),
            (1.0, True),
            "refresh failing while the database is away",
        )
        os.replace(away, database)
        recovered = _until(
            server,
            lambda s: _value(s, "quart_service_refresh_failing"),
            0.0,
            "refresh recovered once the database is back",
        )

        # Documented kinds of database queries: the admin API reads and writes.
        before_reads = _scrape(server)
        for _ in range(2):
            listed = httpx.get(server.url + "/admin/models", headers=admin)
            assert listed.status_code == 200
        reads = _delta(_scrape(server), before_reads)

    assert _value(moved, "quart_service_refresh_runs_total") == 3
    assert _value(moved, QUERIES, kind="load") == 3
    # 1 poll per interval by the one leader; each change was seen by a poll.
    polls = _value(moved, QUERIES, kind="poll")
    assert 3 <= polls <= elapsed / INTERVAL + 2, (polls, elapsed)
    assert _value(after, "quart_service_leader") == 1
    assert _value(after, "quart_service_leader_changes_total") == 1
    assert _value(after, "quart_service_snapshot_published_generation") == generation + 3
    assert 0 <= _value(after, "quart_service_snapshot_age_seconds") < 2
    assert _value(after, "quart_service_refresh_failing") == 0
    assert _value(moved, "quart_service_refresh_failures_total") == 0

    # a: k missed once, hit twice; b: k missed once, hit once, 'absent' missed once;
    # a: 2 failed loads (each a miss).
    assert _value(moved, "quart_service_cache_requests_total", result="miss") == 5
    assert _value(moved, "quart_service_cache_requests_total", result="hit") == 3
    assert _value(moved, "quart_service_cache_loads_total", outcome="ok") == 3
    assert _value(moved, "quart_service_cache_loads_total", outcome="error") == 2

    assert all(0 < n <= 20 for n in tokens), tokens
    assert _value(moved, "quart_service_ai_completion_tokens_total") == sum(tokens)

    assert _value(failing, "quart_service_refresh_failing") == 1
    assert _value(_delta(recovered, after), "quart_service_refresh_failures_total") >= 1
    assert _value(_delta(recovered, after), "quart_service_refresh_runs_total") == 0

    # docs/operations.md: kind is poll, load, startup, read or write.
    kinds = {dict(labels)["kind"] for name, labels in recovered if name == QUERIES}
    assert kinds <= {"poll", "load", "startup", "read", "write"}, kinds
    assert _value(moved, QUERIES, kind="write") == 1  # the admin API's INSERT
    assert _value(reads, QUERIES, kind="read") == 2  # one SELECT per listing


# -- quart-service serve: restarts, counters of dead workers, gauges of live ones ----------------


@pytest.mark.slow
def test_serve_counts_restarts_keeps_dead_workers_counters_and_drops_their_gauges(
    tmp_path: Path,
) -> None:
    env = {**QUIET, "QUART_SERVICE_STREAM_DRAIN_TIMEOUT": "0.5"}
    with running_server(tmp_path, workers=2, env=env, command="serve") as server:
        time.sleep(0.35)  # the start-up checks' requests reach the files (every 0.25 s)
        before = _scrape(server)
        answered = 0
        for _ in range(10):
            assert httpx.get(server.url + "/livez", headers=CLOSE).status_code == 200
            answered += 1
        # What a worker moved to its file survives its SIGKILL (a kill loses at most
        # the last 0.25 s of its request tallies: docs/operations.md).
        _until(
            server,
            lambda s: _value(
                _delta(s, before), REQUESTS, route="/livez", method="GET", status="200"
            ),
            10.0,
            "the requests reached the metric files",
        )

        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> list[int]:
            pids = server.worker_pids()
            log = server.log()
            serving = all(f"worker {pid} serving (started in" in log for pid in pids)
            return pids if len(pids) == 2 and victim not in pids and serving else []

        live = wait_for(replaced, "a replacement for the killed worker serves")
        for _ in range(10):
            assert httpx.get(server.url + "/livez", headers=CLOSE).status_code == 200
            answered += 1
        # The killed worker's requests still count: a counter never goes back.
        crashed = _until(
            server,
            lambda s: (
                _value(_delta(s, before), RESTARTS, reason="crashed"),
                sorted(_series(s, WORKER_THREADS)),
                sorted(_series(s, WORKER_MEMORY)),
                _value(_delta(s, before), REQUESTS, route="/livez", method="GET", status="200"),
            ),
            (1.0, sorted(live), sorted(live), float(answered)),
            "one crash counted; worker gauges of the live workers only; every request counted",
        )

        # SIGHUP: every worker replaced, one at a time; a stream on an old worker gets
        # the shutdown event when its drain ends.
        sock = _open_stream(server, "/async-stream?delay=0.1")
        os.kill(server.process.pid, signal.SIGHUP)
        try:
            ended = _read_until(sock, b"shutdown")
        finally:
            _abort(sock)

        def reloaded() -> list[int]:
            pids = server.worker_pids()
            return pids if len(pids) == 2 and not set(pids) & set(live) else []

        fresh = wait_for(reloaded, "both workers replaced after SIGHUP", timeout=30)
        after = _until(
            server,
            lambda s: (
                _value(_delta(s, before), RESTARTS, reason="reload"),
                _value(_delta(s, before), RESTARTS, reason="crashed"),
                _value(_delta(s, before), STREAM_ENDS, reason="shutdown"),
                sorted(_series(s, WORKER_THREADS)),
            ),
            (2.0, 1.0, 1.0, sorted(fresh)),
            "2 reload restarts, the stream ended by the drain, gauges of the new workers",
            timeout=20,
        )

    assert b"event: error" in ended
    moved = _delta(crashed, before)
    assert _value(moved, RESTARTS, reason="startup_failed") == 0
    assert _value(_delta(after, before), RESTARTS, reason="startup_failed") == 0
