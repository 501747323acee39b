"""Database load and change latency of the data plane, against a per-worker refresh.

    python -m bench.refresh [--seconds 10] [--changes 50]

1. Queries per refresh interval, for 1, 2, 4 and 8 workers of one host, counted by
   every worker (/debug/identity), next to what a per-worker refresh would cost
   (one poll per worker per interval).
2. How long a change made with the sqlite3 shell takes to be visible in every worker
   (4 workers), p50 and p99 over ``--changes`` changes.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from statistics import median, quantiles
from typing import Any

import httpx

from tests.support.data import put_model, wait_all
from tests.support.server import pin_workers, running_server

INTERVAL = 0.5


def _env(data_dir: Path) -> dict[str, str]:
    return {
        "QUART_SERVICE_DATA_DIR": str(data_dir),
        "QUART_SERVICE_REFRESH_INTERVAL": str(INTERVAL),
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
    }


def _total_queries(clients: dict[int, httpx.Client]) -> int:
    total = 0
    for client in clients.values():
        queries: dict[str, int] = client.get("/debug/identity").json()["data"]["queries"]
        total += sum(queries.values())
    return total


def queries_per_interval(workers: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with running_server(root, workers=workers, env=_env(root / "data")) as server:
            clients = pin_workers(server, workers)
            try:
                time.sleep(2 * INTERVAL)  # past start-up
                before = _total_queries(clients)
                time.sleep(seconds)
                after = _total_queries(clients)
            finally:
                for client in clients.values():
                    client.close()
    return (after - before) / (seconds / INTERVAL)


def change_delays(changes: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        database = root / "data" / "quart_service.db"
        with running_server(root, workers=4, env=_env(root / "data")) as server:
            clients = pin_workers(server, 4)
            delays = []
            # Changes at random moments: right after a worker saw the last one, the
            # leader's next poll is always ~one interval away, which would skew this.
            jitter = random.Random(1)
            try:
                for n in range(changes):
                    time.sleep(jitter.uniform(0, INTERVAL))
                    expected = {"v": n}
                    started = time.monotonic()
                    put_model(database, "bench", expected)

                    def arrived(answer: Any, expected: dict[str, int] = expected) -> bool:
                        return bool(answer["models"].get("bench") == expected)

                    wait_all(clients, "/data", arrived, timeout=10)
                    delays.append(time.monotonic() - started)
            finally:
                for client in clients.values():
                    client.close()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--changes", type=int, default=50)
    args = parser.parse_args()
    print(f"refresh_interval {INTERVAL} s, idle for {args.seconds:g} s")
    print(f"{'workers':>7} {'queries/interval':>17} {'per-worker refresh':>19}")
    for workers in (1, 2, 4, 8):
        measured = queries_per_interval(workers, args.seconds)
        print(f"{workers:7d} {measured:17.2f} {workers:19d}", flush=True)
    delays = change_delays(args.changes)
    p50 = median(delays)
    p99 = quantiles(delays, n=100, method="inclusive")[98] if len(delays) >= 2 else delays[0]
    print(
        f"\nchange by the sqlite3 shell visible in all 4 workers, {len(delays)} changes "
        "(includes the shell's own start-up):"
    )
    print(f"  p50 {p50 * 1000:.0f} ms   p99 {p99 * 1000:.0f} ms   max {max(delays) * 1000:.0f} ms")
    print(f"  target: refresh_interval + 0.5 s = {(INTERVAL + 0.5) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
