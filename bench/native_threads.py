"""Threads and CPU per request with and without the native thread budget, in one run.

    python -m bench.native_threads [--requests 200] [--count 2] [--rounds 2] [--serve]

The numeric test app (tests/apps/numeric.py: 256 x 256 float64 matrix products on
numpy's OpenBLAS, on each worker's shared pool) under a real server with 2 workers
and a pool of 8, in two modes started in turn, rounds interleaved:

* ``budget``  ``native_threads = 0`` (the default): CPUs / workers threads each;
* ``off``     ``native_threads = -1``: OpenBLAS's own default, a thread per CPU.

Each round warms the workers (numpy loads), then sends ``--requests`` requests at
once, each ``--count`` products. Reported per mode: each worker's peak threads
(sampled from /proc every 10 ms), its native threads (threads Python did not start,
from /debug/identity), the workers' CPU time per request (utime + stime from /proc),
the wall time of the burst and the load generator's own CPU. No timing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from quart_service.native_threads import CAP_VARIABLES, affinity_cpus, available_cpus
from tests.support.server import Server, peak_threads, pinned_workers, running_server

APP = "tests.apps.numeric:app"
WORKERS = 2
POOL = 8
MODES = {"budget": "0", "off": "-1"}


@dataclass
class Result:
    """One mode's measurements over the rounds."""

    peaks: list[int] = field(default_factory=list)
    native: list[int] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    loader_cpu_ms: list[float] = field(default_factory=list)
    budget: int = 0


async def _burst(url: str, requests: int, count: int) -> None:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one() -> None:
            response = await client.get(f"{url}/matmul", params={"count": count})
            response.raise_for_status()

        await asyncio.gather(*(one() for _ in range(requests)))


def _cpu(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def _round(server: Server, result: Result, requests: int, count: int) -> None:
    asyncio.run(_burst(server.url, 2 * WORKERS * POOL, 1))  # warm: numpy loads
    pids = server.worker_pids()
    cpu, loader, started = _cpu(pids), time.process_time(), time.monotonic()
    with peak_threads(pids) as peak:
        asyncio.run(_burst(server.url, requests, count))
    result.wall.append(time.monotonic() - started)
    result.loader_cpu_ms.append((time.process_time() - loader) / requests * 1000)
    result.cpu_ms.append((_cpu(pids) - cpu) / requests * 1000)
    result.peaks.extend(peak.values())
    with pinned_workers(server, WORKERS) as clients:
        for client in clients.values():
            native = client.get("/debug/identity").json()["worker"]["native_threads"]
            result.native.append(native["native_running"])
            result.budget = native["budget"]


def main() -> None:
    """Run the modes in turn and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--count", type=int, default=2, help="products per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="quart-service serve")
    args = parser.parse_args()
    for name in CAP_VARIABLES:
        os.environ.pop(name, None)  # the operator's caps would hide the difference
    results = {mode: Result() for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            for mode, setting in MODES.items():
                env = {
                    "QUART_SERVICE_NATIVE_THREADS": setting,
                    "QUART_SERVICE_EXECUTOR_THREADS": str(POOL),
                    "QUART_SERVICE_EXECUTOR_QUEUE": "10000",
                    "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
                    "QUART_SERVICE_ACCESS_LOG": "0",
                }
                folder = Path(tmp) / f"{mode}-{n}"
                folder.mkdir()
                command = "serve" if args.serve else "hypercorn"
                with running_server(
                    folder, app=APP, workers=WORKERS, env=env, command=command
                ) as server:
                    _round(server, results[mode], args.requests, args.count)
    print(
        f"{WORKERS} workers, pool {POOL}, {affinity_cpus()} CPUs by affinity "
        f"({available_cpus()} available); {args.requests} requests at once x "
        f"{args.count} products of 256x256 float64; {args.rounds} rounds"
    )
    print(
        f"{'mode':8} {'budget':>6} {'peak threads/worker':>20} {'native threads':>15} "
        f"{'worker CPU/request':>19} {'burst wall':>11} {'loader CPU/request':>19}"
    )
    for mode, r in results.items():
        budget = r.budget if mode == "budget" else "off"
        print(
            f"{mode:8} {budget!s:>6} {min(r.peaks):>9}-{max(r.peaks):<10} "
            f"{min(r.native):>7}-{max(r.native):<7} "
            f"{statistics.median(r.cpu_ms):>15.2f} ms {statistics.median(r.wall):>9.2f} s "
            f"{statistics.median(r.loader_cpu_ms):>16.2f} ms"
        )


if __name__ == "__main__":
    main()
