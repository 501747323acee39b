"""Thread per stream, measured: Flask on Gunicorn's gthread workers against the service.

    python -m bench.thread_per_stream [--streams 100,1000,5000] [--hold 5] [--probes 100]

For each count of open streams, on loopback, 2 worker processes per server:

* ``service``       quart_service (``bench.apps:service``) under ``quart-service serve``
  (the shipped hypercorn.toml): ``GET /idle``, one event then heartbeats, on the
  event loop; pool of 16 threads that the streams do not use;
* ``flask-gthread`` Flask (``bench.flask_streams``) on ``gunicorn -k gthread`` with
  ``--threads`` = streams + 16 per worker and ``--worker-connections`` to match:
  each open stream holds a thread (its generator sleeps between heartbeats), so a
  worker needs a thread per stream it serves, and the workers share one listening
  socket whose split is uneven, so each must be able to take them all (the pool
  starts threads only as streams arrive).

Streams are opened by :mod:`bench.idle_streams`' client processes (raw uvloop
protocols) with a heartbeat every 2 s; once all are open and held for ``--hold`` s:
the peak threads of each worker and the workers' summed PSS (/proc), the resident
memory the streams added per stream, the heartbeats received in time, and the latency
of other requests meanwhile (``--probes`` sequential ``GET`` on new connections from
another process: ``/livez``, or Flask's ``/hello``), and the workers' CPU while they
hold the streams.

Then what a *fixed* thread count does (Gunicorn's documented way to run gthread:
``--threads`` a small multiple of the cores; here 2 workers x 16 threads): 100 streams
are opened; streams beyond the threads of the worker that accepted them get no first
event, and of 10 ``GET /hello`` sent meanwhile on new connections, those that land
on a worker with no free thread get no answer within 2 s. Bounded in time: every wait
has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from quart_service.observability.proc import thread_count
from tests.support.memory import memory
from tests.support.server import Server, free_port, running_server

from ._servers import launch, started
from .idle_streams import _FD_SLACK, measure, raise_nofile

HEARTBEAT = 2.0
WORKERS = 2


@dataclass
class Gunicorn(Server):
    """A running Gunicorn master; its workers are its forked children."""

    def worker_pids(self) -> list[int]:
        pids = []
        for child in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
        return sorted(pids)


@contextlib.contextmanager
def running_gunicorn(folder: Path, threads: int, connections: int) -> Iterator[Gunicorn]:
    """``gunicorn -k gthread`` with ``WORKERS`` workers of ``threads`` threads."""
    port = free_port()
    log_path = folder / f"gunicorn-{port}.log"
    command = [
        sys.executable, "-m", "gunicorn", "-k", "gthread",
        "--workers", str(WORKERS), "--threads", str(threads),
        "--worker-connections", str(connections), "--backlog", "2048",
        "--timeout", "120", "--graceful-timeout", "2",
        "--bind", f"127.0.0.1:{port}", "bench.flask_streams:app",
    ]  # fmt: skip
    env = {"BENCH_HEARTBEAT": str(HEARTBEAT)}
    server = Gunicorn(launch(command, env, log_path), port, log_path)

    def ready() -> bool:
        if len(server.worker_pids()) < WORKERS:
            return False
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(server.url + "/hello", timeout=2).raise_for_status()
            return True
        return False

    with started(server, "gunicorn", ready, timeout=30, every=0.1):
        yield server


@contextlib.contextmanager
def running(stack: str, folder: Path, streams: int) -> Iterator[tuple[Server, str]]:
    """The server of ``stack`` sized for ``streams``, and the path its probe asks."""
    if stack == "service":
        env = {
            "QUART_SERVICE_STREAM_HEARTBEAT": str(HEARTBEAT),
            "QUART_SERVICE_STREAM_IDLE_TIMEOUT": "0",
            "QUART_SERVICE_ACCESS_LOG": "0",
            "QUART_SERVICE_EXECUTOR_THREADS": "16",
        }
        with running_server(
            folder, app="bench.apps:service", workers=WORKERS, env=env, command="serve"
        ) as server:
            yield server, "/livez"
    else:
        # The workers share one listening socket and the split is uneven (one may take
        # most streams), so each must be able to hold all of them: a stream beyond a
        # worker's threads waits in its queue and never gets its first event.
        # gunicorn starts the threads as connections need them.
        per_worker = streams + 16
        with running_gunicorn(folder, per_worker, per_worker + 64) as gunicorn:
            yield gunicorn, "/hello"


def held_state(pids: list[int], into: dict[str, Any]) -> None:
    """While the streams are held: each worker's threads and the summed PSS."""
    into["threads"] = [thread_count(pid) for pid in pids]
    into["pss_mb"] = sum(memory(pid).pss for pid in pids) / 2**20


def base_state(server: Server) -> dict[str, Any]:
    pids = server.worker_pids()
    return {
        "threads": [thread_count(pid) for pid in pids],
        "pss_mb": sum(memory(pid).pss for pid in pids) / 2**20,
    }


# -- a fixed thread count ---------------------------------------------------------------------


async def _fixed_pool_check(port: int, streams: int, wait: float, probes: int) -> dict[str, Any]:
    """Open ``streams`` streams; count first events within ``wait`` s; then send
    ``probes`` ``GET /hello``, each on a new connection and bounded by ``wait``."""
    request = b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n"
    writers: list[asyncio.StreamWriter] = []
    evented = 0

    async def one() -> None:
        nonlocal evented
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(request)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"data: "), wait)
            evented += 1

    await asyncio.gather(*(one() for _ in range(streams)))
    answered: list[float] = []
    for _ in range(probes):
        began = time.monotonic()
        with contextlib.suppress(httpx.TimeoutException):
            async with httpx.AsyncClient(timeout=wait) as client:
                response = await client.get(f"http://127.0.0.1:{port}/hello")
                response.raise_for_status()
                answered.append(time.monotonic() - began)
    for writer in writers:
        writer.transport.abort()
    return {"streams": streams, "evented": evented, "probes": probes, "answered": answered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="100,1000,5000")
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--stacks", default="service,flask-gthread")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    limit = raise_nofile(max(counts) + _FD_SLACK)
    print(f"RLIMIT_NOFILE {limit} (the servers inherit it); heartbeat every {HEARTBEAT:g} s")
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for streams in counts:
            for stack in args.stacks.split(","):
                folder = Path(tmp) / f"{stack}-{streams}"
                folder.mkdir()
                began = time.monotonic()
                with running(stack, folder, streams) as (server, probe):
                    base = base_state(server)
                    held: dict[str, Any] = {}
                    row = asyncio.run(
                        measure(
                            server,
                            probe,
                            streams,
                            args.hold,
                            args.probes,
                            heartbeat=HEARTBEAT,
                            rate=1000.0,
                            on_held=lambda pids, held=held: held_state(pids, held),
                        )
                    )
                results[(stack, streams)] = {**row, "base": base, "held": held}
                print(
                    f"  {stack} {streams}: {row['first_event']} streams open, "
                    f"{time.monotonic() - began:.0f} s",
                    flush=True,
                )
        fixed: dict[str, Any] | None = None
        if "flask-gthread" in args.stacks:
            folder = Path(tmp) / "fixed"
            folder.mkdir()
            with running_gunicorn(folder, 16, 1000) as gunicorn:
                fixed = asyncio.run(_fixed_pool_check(gunicorn.port, 100, 2.0, 10))
    print(
        f"\n{'stack':14} {'streams':>7} {'open':>6} {'beats ok':>8} {'threads/wkr':>12} "
        f"{'PSS MB':>14} {'KiB/stream':>10} {'probe p50':>9} {'p99 ms':>7} {'CPU %':>6}"
    )
    for (stack, streams), row in results.items():
        threads = "/".join(str(t) for t in row["held"].get("threads", []))
        base_threads = "/".join(str(t) for t in row["base"]["threads"])
        pss = f"{row['base']['pss_mb']:.0f}->{row['held'].get('pss_mb', 0):.0f}"
        print(
            f"{stack:14} {streams:7d} {row['first_event']:6d} {row['heartbeats']:8d} "
            f"{base_threads + '->' + threads:>12} {pss:>14} {row['kib_per_stream']:10.1f} "
            f"{row['probe_p50_ms']:9.1f} {row['probe_p99_ms']:7.1f} "
            f"{row['worker_cpu_held_pct']:6.1f}"
        )
    print(
        "  (threads and PSS: before the streams -> while held; KiB/stream: resident memory "
        "added per stream; probe: other requests meanwhile, new connection each; CPU: the "
        "workers' while held, % of one core)"
    )
    if fixed is not None:
        answered = fixed["answered"]
        slowest = f", the slowest in {max(answered) * 1000:.0f} ms" if answered else ""
        print(
            f"\nflask-gthread, fixed 2 workers x 16 threads: {fixed['evented']} of "
            f"{fixed['streams']} streams got their first event within 2 s; then "
            f"{len(answered)} of {fixed['probes']} GET /hello (new connections) answered "
            f"within 2 s{slowest}"
        )


if __name__ == "__main__":
    main()
