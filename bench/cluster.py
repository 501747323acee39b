"""The cluster's figures, measured on the real service: several simulated hosts
(servers with separate data folders, 2 workers each) sharing one PostgreSQL and one
Redis, each started here on loopback.

    python -m bench.cluster [--hosts 1,2,3] [--changes 30] [--seconds 10]

For each number of hosts:

* **statements per refresh interval while idle**, counted in PostgreSQL's own
  statement log (``log_statement=all``), not by the service;
* **Redis commands per second per worker while idle**, from ``INFO commandstats``
  after ``CONFIG RESETSTAT`` (calls made inside Lua scripts included; this bench's own
  INFO/CONFIG left out), and Redis's connected clients;
* **change to visible**: an admin write on host 0 until every worker of every host
  serves it, p50 / p99 over ``--changes``;
* the bench's own CPU (the load generator: the pollers).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median, quantiles
from typing import Any

from quart_service.coordination.redis import connect
from quart_service.data.markers import MARKERS_QUERY
from quart_service.data.migrations import apply_migrations
from tests.support.cluster import ADMIN_TOKEN, INTERVAL, running_cluster
from tests.support.data import _LOGGED, wait_all
from tests.support.postgres import postgres_server
from tests.support.redis import running_redis

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
_OWN = {"info", "config", "client", "ping"}


def _statements(log_lines: list[str]) -> list[str]:
    found = []
    for line in log_lines:
        match = _LOGGED.search(line)
        if match:
            found.append(" ".join(match.group(1).split()))
    return found


async def _redis_stats(url: str) -> tuple[int, int]:
    client = connect(url)
    try:
        stats = await client.info("commandstats")
        clients = await client.info("clients")
    finally:
        await client.aclose()
    calls = sum(
        int(v["calls"])
        for k, v in stats.items()
        if k.startswith("cmdstat_") and k[8:].split("|")[0] not in _OWN
    )
    return calls, int(clients["connected_clients"]) - 1


async def _reset(url: str) -> None:
    client = connect(url)
    try:
        await client.config_resetstat()
    finally:
        await client.aclose()


def _serves(value: int) -> Callable[[dict[str, Any]], bool]:
    return lambda answer: bool(answer["models"]["local-ngram"].get("v") == value)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(hosts: int, changes: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, postgres_server() as pg:
        root = Path(tmp)
        url = pg.url()
        apply_migrations(url)
        with (
            running_redis(root / "redis") as redis,
            running_cluster(
                root, hosts, redis.url, extra={"QUART_SERVICE_DATABASE_URL": url}
            ) as cluster,
        ):
            workers = len(cluster.clients)
            wait_all(cluster.clients, "/data", lambda a: "local-ngram" in a["models"], 15)
            time.sleep(3 * INTERVAL)
            # Idle: the database's and Redis's view.
            asyncio.run(_reset(redis.url))
            before = len(_statements(pg.log_lines()))
            time.sleep(seconds)
            quiet = _statements(pg.log_lines())[before:]
            calls, connections = asyncio.run(_redis_stats(redis.url))
            # Changes: an admin write on host 0, until every worker serves it.
            writer = next(iter(cluster.workers(0).values()))
            cpu = _cpu()
            delays: list[float] = []
            for value in range(changes):
                body = {"parameters": {"v": value}}
                answer = writer.patch("/admin/models/local-ngram", json=body, headers=AUTH)
                assert answer.status_code == 200, answer.text
                reached = wait_all(cluster.clients, "/data", _serves(value), timeout=10)
                delays.append(max(reached.values()))
            bench_cpu = _cpu() - cpu
    return {
        "hosts": hosts,
        "workers": workers,
        "statements_per_interval": len(quiet) / (seconds / INTERVAL),
        "other_statements": sorted({s for s in quiet if s != MARKERS_QUERY}),
        "redis_calls_per_s_per_worker": calls / seconds / workers,
        "redis_connections": connections,
        "visible_p50": median(delays),
        "visible_p99": quantiles(delays, n=100, method="inclusive")[98],
        "bench_cpu_s": bench_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="1,2,3")
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"refresh_interval {INTERVAL} s, 2 workers per host, PostgreSQL + Redis on loopback")
    print(
        f"{'hosts':>5} {'workers':>7} {'stmts/interval':>14} {'redis calls/s/worker':>20} "
        f"{'redis conns':>11} {'visible p50':>11} {'p99':>6} {'bench CPU s':>11}"
    )
    for hosts in (int(h) for h in args.hosts.split(",")):
        r = run(hosts, args.changes, args.seconds)
        print(
            f"{r['hosts']:>5} {r['workers']:>7} {r['statements_per_interval']:>14.2f} "
            f"{r['redis_calls_per_s_per_worker']:>20.2f} {r['redis_connections']:>11} "
            f"{r['visible_p50']:>11.3f} {r['visible_p99']:>6.3f} {r['bench_cpu_s']:>11.2f}"
        )
        if r["other_statements"]:
            print("      other statements while idle:", r["other_statements"])


if __name__ == "__main__":
    main()
