"""How ``quart-service serve`` spreads connections over its workers, in one run.

    python -m bench.balance [--seconds 5] [--rounds 2] [--connections 64] [--streams 200]

Two modes of the same server (2 workers, the shipped hypercorn.toml, access log off),
started in turn, rounds interleaved:

* ``shared``      ``--shared-socket``: every worker accepts on one listening socket
                  (plain Hypercorn's way, and ``serve``'s before issue 13);
* ``per-worker``  the default: one ``SO_REUSEPORT`` socket per worker.

Measured for each:

* ``bursts``: 4 bursts of 64 requests at once, each on a new connection (one httpx
  client; its connections arrive a little apart, as real clients' do): the busiest
  worker's share of each burst;
* ``wrk``: ``wrk -t2 -c64 --latency`` on ``/livez``: the busiest worker's share of
  wrk's open connections (counted per worker pid from /proc mid-run), its share of
  the workers' CPU time, p99 latency, requests/s, worker CPU per request and wrk's
  own CPU (this machine has 2 cores, shared by wrk and the workers);
* ``sse``: ``--streams`` long-lived SSE streams opened over 2 s, on idle workers and
  again while ``wrk -t1 -c16`` keeps them busy; each stream's first event names its
  worker: how many streams each worker holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import httpx
import psutil

from tests.support.server import SHIPPED_CONFIG, Server, free_port, wait_until_serving

from ._servers import launch
from ._wrk import measure_wrk

APP = "quart_service.app:app"
WORKERS = 2
BURST = 64
MODES = {"shared": ["--shared-socket"], "per-worker": []}


@dataclass
class Sample:
    bursts: list[list[int]]  # per burst: new connections per worker, busiest first
    wrk_connections: list[int]  # wrk's open connections per worker, busiest first
    cpu_share: float  # the busiest worker's share of the workers' CPU under wrk
    p99_ms: float
    requests_per_s: float
    cpu_us_per_request: float
    wrk_cpu_percent: float  # wrk's own CPU, in % of one core
    streams_idle: list[int]  # SSE streams per worker, busiest first
    streams_loaded: list[int]  # the same, opened while wrk ran


def _busiest(counts: list[int]) -> float:
    return counts[0] / sum(counts) if sum(counts) else 0.0


def _split(counts: list[int]) -> str:
    return "/".join(str(c) for c in counts)


def _per_worker(counter: Counter[int], pids: list[int]) -> list[int]:
    return sorted((counter.get(pid, 0) for pid in pids), reverse=True)


def start(tmp: Path, mode: str, *, stream_heartbeat: float = 15) -> Server:
    """``quart-service serve`` with 2 workers in ``mode``."""
    port = free_port()
    log_path = tmp / f"serve-{mode}-{port}.log"
    env = {
        "QUART_SERVICE_DATA_DIR": str(tmp / f"data-{port}"),
        "QUART_SERVICE_ACCESS_LOG": "0",
        "QUART_SERVICE_STREAM_HEARTBEAT": str(stream_heartbeat),
    }
    command = [
        sys.executable, "-m", "quart_service.server.cli", "serve", APP,
        "--config", str(SHIPPED_CONFIG), "--bind", f"127.0.0.1:{port}",
        "--workers", str(WORKERS), *MODES[mode],
    ]  # fmt: skip
    server = Server(launch(command, env, log_path), port, log_path)
    try:
        wait_until_serving(server, WORKERS, 30)
    except BaseException:
        server.stop()
        raise
    return server


async def _request_pid(port: int, path: str) -> tuple[int, asyncio.StreamWriter]:
    """Open a connection, GET ``path``, return the pid the first JSON names (a
    ``/livez`` body or an SSE event's data) and the open connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(30):
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError(f"{path}: the connection closed before a pid")
            match = re.search(rb'"pid":\s*(\d+)', line)
            if match:
                return int(match.group(1)), writer


async def _burst(url: str, count: int) -> Counter[int]:
    """``count`` requests at once, each on a new connection: which worker answered."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        answers = await asyncio.gather(*(client.get("/livez") for _ in range(count)))
    return Counter(answer.json()["pid"] for answer in answers)


async def _streams(port: int, count: int, over: float) -> Counter[int]:
    """``count`` SSE streams opened evenly over ``over`` seconds and held open until
    all are: which worker sent each one's first event."""
    path = "/demo/stream?count=100000&interval=1"
    tasks = []
    for _ in range(count):
        tasks.append(asyncio.create_task(_request_pid(port, path)))
        await asyncio.sleep(over / count)
    opened = await asyncio.gather(*tasks)
    for _, writer in opened:
        writer.close()
    return Counter(pid for pid, _ in opened)


def _connections_per_pid(pids: list[int], port: int) -> Counter[int]:
    """Established connections on the server's port, per worker pid (from /proc)."""
    counts: Counter[int] = Counter()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port:
                counts[pid] += 1
    return counts


def measure(server: Server, seconds: float, connections: int, streams: int) -> Sample:
    pids = server.worker_pids()
    bursts = [_per_worker(asyncio.run(_burst(server.url, BURST)), pids) for _ in range(4)]
    counted: Counter[int] = Counter()

    def count_midway() -> None:
        time.sleep(seconds / 2)
        counted.update(_connections_per_pid(pids, server.port))

    load = measure_wrk(
        server, "/livez", seconds, connections, latency=True, threads=False, meanwhile=count_midway
    )
    idle = asyncio.run(_streams(server.port, streams, over=2.0))
    background = subprocess.Popen(
        ["wrk", "-t1", "-c16", "-d4s", server.url + "/livez"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        loaded = asyncio.run(_streams(server.port, streams, over=2.0))
    finally:
        background.wait(timeout=30)
    return Sample(
        bursts=bursts,
        wrk_connections=_per_worker(counted, pids),
        cpu_share=load.busiest,
        p99_ms=load.run.p99_ms,
        requests_per_s=load.run.completed / load.elapsed,
        cpu_us_per_request=sum(load.worker_cpu) / load.run.completed * 1e6,
        wrk_cpu_percent=load.run.cpu / load.elapsed * 100,
        streams_idle=_per_worker(idle, pids),
        streams_loaded=_per_worker(loaded, pids),
    )


def run(seconds: float, rounds: int, connections: int, streams: int) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(1, rounds + 1):
            modes = list(MODES) if round_no % 2 else list(reversed(MODES))
            for mode in modes:
                server = start(Path(tmp), mode)
                try:
                    sample = measure(server, seconds, connections, streams)
                finally:
                    server.stop()
                samples[mode].append(sample)
                print(f"round {round_no} {mode:10} {json.dumps(sample.__dict__)}", flush=True)
    return samples


def report(samples: dict[str, list[Sample]]) -> None:
    print(
        "\n2 workers; splits are per round (busiest worker first), the rest medians\n"
        "over rounds. bursts: the busiest worker's share of each burst of 64 new\n"
        "connections; wrk conns: wrk -c64's connections per worker; CPU: the busiest\n"
        "worker's share of the workers' CPU under wrk."
    )
    for mode, runs in samples.items():
        shares = [_busiest(burst) for run in runs for burst in run.bursts]
        print(
            f"\n{mode}\n"
            f"  bursts      {' '.join(f'{share:.0%}' for share in shares)}"
            f"  (median {median(shares):.0%}, worst {max(shares):.0%})\n"
            f"  wrk conns   {', '.join(_split(r.wrk_connections) for r in runs)}\n"
            f"  CPU         {', '.join(f'{r.cpu_share:.0%}' for r in runs)}\n"
            f"  p99         {median(r.p99_ms for r in runs):.1f} ms"
            f" ({', '.join(f'{r.p99_ms:.1f}' for r in runs)})\n"
            f"  req/s       {median(r.requests_per_s for r in runs):.0f}"
            f"  worker CPU {median(r.cpu_us_per_request for r in runs):.0f} us/request"
            f"  wrk CPU {median(r.wrk_cpu_percent for r in runs):.0f} % of a core\n"
            f"  SSE idle    {', '.join(_split(r.streams_idle) for r in runs)}\n"
            f"  SSE loaded  {', '.join(_split(r.streams_loaded) for r in runs)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk: apt-get install wrk")
    report(run(args.seconds, args.rounds, args.connections, args.streams))


if __name__ == "__main__":
    main()
