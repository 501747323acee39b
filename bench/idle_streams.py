"""Thousands of idle SSE streams held open on one host: memory, heartbeats, liveness.

    python -m bench.idle_streams --streams 5000 --hold 10

For each stack (the service, and bare Quart with hand-written heartbeats, both on the
shipped hypercorn.toml with 2 workers) it opens ``--streams`` connections to
``/idle``: one event, then only heartbeats. Once all are open it reports the workers'
resident memory per stream (against the same server with no stream), how many
streams received a heartbeat within two intervals, and the latency of a probe
request (``/livez`` for the service), sent from another process, while they are held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from quart_service.observability.proc import rss_bytes
from tests.support.server import SHIPPED_CONFIG, Server, running_server

HEARTBEAT = 2.0
_REQUEST = b"GET /idle HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"


@dataclass
class Held:
    opened: int = 0
    first_event: int = 0
    heartbeats: int = 0  # streams that got at least one heartbeat after the event


async def _hold(port: int, held: Held, stop: asyncio.Event, beats: set[int], ident: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_REQUEST)
        held.opened += 1
        buffer = b""
        while b"data: " not in buffer:
            chunk = await reader.read(4096)
            if not chunk:
                return
            buffer += chunk
        held.first_event += 1
        buffer = buffer.split(b"data: ", 1)[1]
        while not stop.is_set():
            if b": keep-alive" in buffer and ident not in beats:
                beats.add(ident)
                held.heartbeats += 1
            chunk = await _read_or_stop(reader, stop)
            if not chunk:
                return
            buffer = buffer[-64:] + chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_or_stop(reader: asyncio.StreamReader, stop: asyncio.Event) -> bytes:
    read = asyncio.ensure_future(reader.read(4096))
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if read in done:
        stopped.cancel()
        return read.result()
    read.cancel()
    return b""


async def measure(
    server: Server, probe_path: str, streams: int, hold: float, probes: int = 100
) -> dict[str, float]:
    """Hold ``streams`` idle streams on ``server``; memory, heartbeats, probe latency."""
    pids = server.worker_pids()
    baseline = sum(rss_bytes(pid) for pid in pids)
    held = Held()
    stop = asyncio.Event()
    beats: set[int] = set()
    tasks = []
    started = time.monotonic()
    for ident in range(streams):
        tasks.append(asyncio.create_task(_hold(server.port, held, stop, beats, ident)))
        if ident % 200 == 199:
            await asyncio.sleep(0.05)  # do not overrun the listen backlog
    while held.first_event < streams and time.monotonic() - started < 120:
        await asyncio.sleep(0.2)
    opened_in = time.monotonic() - started
    await asyncio.sleep(max(hold, 2 * HEARTBEAT + 1))
    loaded = sum(rss_bytes(pid) for pid in pids)
    latencies = await _probe_path(server.url, probe_path, probes)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "streams": streams,
        "first_event": held.first_event,
        "heartbeats": held.heartbeats,
        "opened_in_s": opened_in,
        "rss_base_mb": baseline / 2**20,
        "rss_held_mb": loaded / 2**20,
        "kib_per_stream": (loaded - baseline) / 1024 / max(held.first_event, 1),
        "probe_p50_ms": statistics.median(latencies) * 1000,
        "probe_p99_ms": sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000,
        "probe_max_ms": max(latencies) * 1000,
    }


# The probe runs in its own process: the holding client's event loop, busy with
# thousands of sockets, must not add its own delays to the measured latency.
_PROBE = """
import json, sys, time, httpx
url, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
latencies = []
with httpx.Client(base_url=url, timeout=10) as client:
    for _ in range(count):
        began = time.perf_counter()
        client.get(path).raise_for_status()
        latencies.append(time.perf_counter() - began)
        time.sleep(0.05)
print(json.dumps(latencies))
"""


async def _probe_path(url: str, path: str, count: int) -> list[float]:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _PROBE, url, path, str(count)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    latencies: list[float] = json.loads(result.stdout)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--hold", type=float, default=6.0)
    args = parser.parse_args()
    env = {
        "QUART_SERVICE_STREAM_HEARTBEAT": str(HEARTBEAT),
        "QUART_SERVICE_STREAM_IDLE_TIMEOUT": "0",
        "QUART_SERVICE_ACCESS_LOG": "0",
    }
    rows = {}
    for name, app, probe in (
        ("service", "bench.apps:service", "/livez"),
        ("bare-tuned", "bench.apps:bare", "/hello"),
    ):
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_server(Path(tmp), app=app, env=env, config=SHIPPED_CONFIG) as server,
        ):
            rows[name] = asyncio.run(measure(server, probe, args.streams, args.hold))
    keys = list(next(iter(rows.values())))
    print(f"{'':16}" + "".join(f"{name:>14}" for name in rows))
    for key in keys:
        print(f"{key:16}" + "".join(f"{rows[name][key]:>14.1f}" for name in rows))


if __name__ == "__main__":
    main()
