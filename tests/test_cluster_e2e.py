"""Several hosts through Redis, simulated as servers with separate data folders that
share one database and one real ``redis-server``: one refresh for the whole cluster,
changes everywhere, and the failures (Redis gone, the leader's host killed) with no
failed read and no second publishing leader."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import quantiles
from typing import Any

import httpx
import pytest

from quart_service.data.markers import MARKERS_QUERY
from quart_service.data.migrations import apply_migrations

from .apps.datasets import SCHEMA
from .support.cluster import ADMIN_TOKEN, INTERVAL, Cluster, running_cluster
from .support.data import Backend, wait_all
from .support.postgres import available as postgres_available
from .support.postgres import postgres_server
from .support.redis import RedisServer, running_redis
from .support.server import pinned_workers, wait_for

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WORKERS = 2  # per host: running_cluster's default


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (the outage test stops and restarts it)."""
    with running_redis(tmp_path / "redis") as server:
        yield server


def _shared_database(backend: Backend) -> dict[str, str]:
    """The one PostgreSQL database every host uses, migrated."""
    apply_migrations(backend.target)
    return {"QUART_SERVICE_DATABASE_URL": backend.url}


def _has_model(value: int) -> Any:
    return lambda answer: answer["models"].get("m") == {"tokens_per_second": value}


def _write(client: httpx.Client, value: int) -> None:
    answer = client.patch(
        "/admin/models/m", json={"parameters": {"tokens_per_second": value}}, headers=AUTH
    )
    if answer.status_code == 404:
        body = {"name": "m", "engine": "local", "parameters": {"tokens_per_second": value}}
        answer = client.post("/admin/models", json=body, headers=AUTH)
    assert answer.status_code in (200, 201), answer.text


def _assert_one_leader_per_generation(cluster: Cluster) -> None:
    published = cluster.publications()
    generations = [generation for generation, _leader in published]
    assert len(generations) == len(set(generations)), published  # never twice
    # Per leader, in its log order, generations only grow.
    by_leader: dict[str, list[int]] = {}
    for generation, leader in published:
        by_leader.setdefault(leader, []).append(generation)
    for leader, seen in by_leader.items():
        assert seen == sorted(seen), (leader, seen)


# Several hosts share PostgreSQL (a SQLite file on one machine is no deployment); the
# single-host tests keep SQLite's guarantees.
ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@ON_POSTGRES
def test_an_admin_write_on_one_host_reaches_every_worker_of_every_host(
    tmp_path: Path, redis: RedisServer, backend: Backend
) -> None:
    # Each write is answered once its host serves it, which in a cluster comes with the
    # cluster leader's next poll: about one whole interval per write. A shorter interval
    # than the other cluster tests' makes the 20 writes cost 20 x 0.25 s.
    interval = INTERVAL / 2
    extra = {**_shared_database(backend), "QUART_SERVICE_REFRESH_INTERVAL": str(interval)}
    with running_cluster(tmp_path, 3, redis.url, extra=extra) as cluster:
        writer = next(iter(cluster.workers(0).values()))
        delays: list[float] = []
        for value in range(20):
            _write(writer, value)
            reached = wait_all(cluster.clients, "/data", _has_model(value), timeout=5)
            delays.append(max(reached.values()))
        p99 = quantiles(delays, n=100, method="inclusive")[98]
        assert p99 <= interval + 0.5, f"p99 {p99:.3f} s: {sorted(delays)}"
        _assert_one_leader_per_generation(cluster)


@ON_POSTGRES
@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_the_cluster_polls_the_database_once_per_interval(
    tmp_path: Path, redis: RedisServer, hosts: int, backend: Backend
) -> None:
    extra = _shared_database(backend)
    backend.shell(SCHEMA)

    def statements() -> dict[str, list[str]]:
        # Counted by PostgreSQL itself: its statement log (log_statement=all).
        return {"server log": backend.statements()}

    with running_cluster(
        tmp_path, hosts, redis.url, app="tests.apps.datasets:app", extra=extra
    ) as cluster:
        names = {"models", "flags", "regions", "notes", "limits"}
        wait_all(
            cluster.clients,
            "/debug/identity",
            lambda a: names <= {n for n, d in a["data"]["datasets"].items() if d["version"]},
            timeout=15,
        )
        time.sleep(2 * INTERVAL)
        before = {name: len(lines) for name, lines in statements().items()}
        window = 10 * INTERVAL
        time.sleep(window)
        quiet = [
            line for name, lines in statements().items() for line in lines[before.get(name, 0) :]
        ]
    assert set(quiet) == {MARKERS_QUERY}, set(quiet)
    polls = window / INTERVAL
    assert polls - 1.5 <= len(quiet) <= polls + 1.5, (hosts, len(quiet))


class _Reader(threading.Thread):
    """Reads /data from every worker in a loop; counts what failed."""

    def __init__(self, clients: dict[int, httpx.Client]) -> None:
        super().__init__(daemon=True)
        self.clients = clients
        self.reads = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, client in list(self.clients.items()):
                try:
                    answer = client.get("/data")
                    if answer.status_code != 200:
                        self.failures.append(f"{pid}: {answer.status_code} {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{pid}: {exc!r}")
                self.reads += 1
            time.sleep(0.02)


@contextlib.contextmanager
def _reading(cluster: Cluster, hosts: list[int]) -> Iterator[_Reader]:
    """A reader of every worker of ``hosts``, on connections of its own: an
    ``httpx.Client`` used from two threads at once may close a socket under the other
    thread's read (seen as ``ReadError: Bad file descriptor``)."""
    with contextlib.ExitStack() as stack:
        clients: dict[int, httpx.Client] = {}
        for host in hosts:
            clients.update(stack.enter_context(pinned_workers(cluster.hosts[host], WORKERS)))
        reader = _Reader(clients)
        reader.start()
        try:
            yield reader
        finally:
            reader.stop.set()
            reader.join(timeout=10)


def test_redis_stopped_for_ten_seconds(tmp_path: Path, redis: RedisServer, pg_url: str) -> None:
    apply_migrations(pg_url)
    extra = {"QUART_SERVICE_DATABASE_URL": pg_url}
    with running_cluster(tmp_path, 3, redis.url, extra=extra) as cluster:
        writer = next(iter(cluster.workers(0).values()))
        _write(writer, 1)
        wait_all(cluster.clients, "/data", _has_model(1), timeout=10)
        with _reading(cluster, [0, 1, 2]) as reader:
            redis.stop()
            stopped = time.monotonic()

            def degraded() -> bool:
                return all(
                    "degraded" in c.get("/readyz").json()["checks"]["data"]
                    for c in cluster.clients.values()
                )

            wait_for(degraded, "every worker's /readyz says degraded", 8)
            for client in cluster.clients.values():
                ready = client.get("/readyz")
                assert ready.status_code == 200  # serving the last snapshot is right
                assert "Redis unreachable" in ready.json()["checks"]["data"]["degraded"]
            _write(writer, 2)  # the database is fine: the write lands, unseen for now
            time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
            redis.start()
            # Back without a restart: the change made meanwhile, and a new one, arrive.
            wait_all(cluster.clients, "/data", _has_model(2), timeout=15)
            _write(writer, 3)
            wait_all(cluster.clients, "/data", _has_model(3), timeout=10)
        assert reader.reads > 100
        assert reader.failures == []
        wait_for(lambda: not degraded(), "/readyz no longer degraded", 10)
        _assert_one_leader_per_generation(cluster)


def test_the_leaders_host_killed_another_leads(
    tmp_path: Path, redis: RedisServer, pg_url: str
) -> None:
    apply_migrations(pg_url)
    extra = {"QUART_SERVICE_DATABASE_URL": pg_url}
    with running_cluster(tmp_path, 3, redis.url, extra=extra) as cluster:
        leader = wait_for(cluster.cluster_leader, "a cluster leader", 10)
        assert leader is not None
        host = cluster.host_of[leader]
        survivors = {
            pid: client for pid, client in cluster.clients.items() if cluster.host_of[pid] != host
        }
        with _reading(cluster, [h for h in range(3) if h != host]) as reader:
            cluster.kill_host(host)
            killed = time.monotonic()
            writer = next(iter(survivors.values()))
            _write(writer, 7)
            wait_all(survivors, "/data", _has_model(7), timeout=10)
            took = time.monotonic() - killed
        assert reader.reads > 20
        assert reader.failures == []  # the other hosts never failed a read
        new_leader = cluster.cluster_leader()
        assert new_leader is not None
        assert cluster.host_of[new_leader] != host
        # Lease TTL (2 s) + one interval, plus a follower's stat and this poll.
        assert took <= 2 + INTERVAL + 0.75, took
        _assert_one_leader_per_generation(cluster)


def test_postgres_stopped_for_ten_seconds(tmp_path: Path, redis: RedisServer) -> None:
    if not postgres_available():
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    with postgres_server() as pg:  # this test's own server: it is stopped
        url = pg.url()
        apply_migrations(url)
        extra = {"QUART_SERVICE_DATABASE_URL": url}
        with running_cluster(tmp_path, 3, redis.url, extra=extra) as cluster:
            writer = next(iter(cluster.workers(0).values()))
            _write(writer, 1)
            wait_all(cluster.clients, "/data", _has_model(1), timeout=10)
            with _reading(cluster, [0, 1, 2]) as reader:
                pg.stop()
                stopped = time.monotonic()
                refused = writer.patch(
                    "/admin/models/m", json={"parameters": {"tokens_per_second": 2}}, headers=AUTH
                )
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "database_unavailable"
                assert int(refused.headers["Retry-After"]) >= 1
                time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
                pg.start()

                def written() -> bool:
                    answer = writer.patch(
                        "/admin/models/m",
                        json={"parameters": {"tokens_per_second": 2}},
                        headers=AUTH,
                    )
                    return answer.status_code == 200

                wait_for(written, "a write accepted once PostgreSQL is back", 15)
                wait_all(cluster.clients, "/data", _has_model(2), timeout=15)
            assert reader.reads > 100
            assert reader.failures == []
            _assert_one_leader_per_generation(cluster)
