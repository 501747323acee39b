"""N concurrent paced token streams: the service against its peers, in one run.

    python -m bench.streams [--streams 100,1000,5000] [--rate 20,10,2] [--seconds 10]
                            [--rounds 2] [--stacks service-hypercorn,fastapi-uvicorn,...]
                            [--clients 1] [--quick]

Each stream is ``GET /tokens?n=K&rate=R`` (bench/stream_apps.py): a small SSE event
(``{"t":"tok"}``) at once, then one every ``1/R`` s from an async generator
(``await asyncio.sleep(1 / R)`` between tokens), ``K = R * seconds + 1`` events in all.
The rate is 20/s unless at most 10,000 events/s in all asks for less (1,000 x 10/s,
5,000 x 2/s). Starts are spread evenly over ``--stagger`` seconds (default: 1 s per
1,000 streams, at least 1 s). Stacks, 2 workers each, on loopback:

* ``service-hypercorn`` — quart_service (``sse()``) under the shipped hypercorn.toml;
* ``service-serve``     — the same under ``quart-service serve`` (the same file; one
  ``SO_REUSEPORT`` socket per worker, so the kernel spreads the connections);
* ``service-granian``   — the same app under Granian (when installed);
* ``service-uvicorn``   — the same app under Uvicorn, uvloop + httptools (when installed);
* ``fastapi-uvicorn``   — FastAPI + sse-starlette's EventSourceResponse on Uvicorn;
* ``bare-quart``        — bare Quart, a hand-written SSE generator, shipped hypercorn.toml.

A server is started afresh for every stack and N (so idle RSS is a clean baseline);
rounds run every N over every stack, the order of stacks rotating each round (the
machine is shared and noisy); tables show medians over rounds. The *steady part* of a
run is when every stream has had its first event and none has ended (see measure).
Per stack and N:

* worker CPU (utime + stime of the worker processes, /proc, sampled every 0.1 s) per
  10,000 events delivered: over the whole run (connects and teardown included) and
  over the steady part; and per stream beyond its events;
* events/s delivered over the steady part (offered: N x R);
* inter-token latency at the client: each gap between consecutive events of a stream,
  as received (the ideal is ``1/R``; events that arrive in one read count a 0 gap),
  p50 and p99, and p99 over the steady part;
* time to first token: from the connect to the first event;
* worker RSS per stream: (RSS of the workers in the steady part minus their RSS
  before) / N;
* the load generator's own CPU (``--clients`` processes, uvloop, raw protocols that only
  count ``data:`` and take timestamps), in % of one core and per 10,000 events;
* the CPU the rest of the machine took meanwhile, and the kernel's listen overflows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import math
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from statistics import median
from typing import cast

import psutil

from quart_service.observability.proc import rss_bytes
from tests.support.server import SHIPPED_CONFIG, free_port, wait_or_kill

from ._servers import launch, started

WORKERS = 2
DEFAULT_STREAMS = (100, 1000, 5000)
# The default rate per stream: 20 tokens/s, but at most 10,000 events/s in all
# (100 x 20/s, 1,000 x 10/s, 5,000 x 2/s). 5,000 x 20/s = 100k events/s is more than
# 2 shared cores can write: every stack fell behind by seconds and cut streams.
DEFAULT_RATE = 20.0
MAX_EVENTS_PER_S = 10_000
# Streams start at 1,000 per second by default (over at least 1 s): 5,000 starts within
# 1 s were a thundering herd of their own (first tokens after 5-14 s on some stacks).
STARTS_PER_S = 1000


# --- the stacks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """A server command line for one app; ``needs``: modules that must be importable."""

    name: str
    argv: Callable[[int], list[str]]
    needs: tuple[str, ...]

    def missing(self) -> list[str]:
        return [name for name in self.needs if importlib.util.find_spec(name) is None]


def _hypercorn(app: str) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable, "-m", "hypercorn", "--config", str(SHIPPED_CONFIG),
        "--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS), app,
    ]  # fmt: skip


def _serve(app: str) -> Callable[[int], list[str]]:
    # The supervised Hypercorn: the same hypercorn.toml, one SO_REUSEPORT socket per worker.
    return lambda port: [
        sys.executable, "-m", "quart_service.server.cli", "serve", "--config",
        str(SHIPPED_CONFIG), "--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS), app,
    ]  # fmt: skip


def _uvicorn(app: str) -> Callable[[int], list[str]]:
    # The flags of docs/servers.md (access log off: the service writes its own).
    return lambda port: [
        sys.executable, "-m", "uvicorn", "--loop", "uvloop", "--http", "httptools",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS),
        "--backlog", "2048", "--lifespan", "on", "--timeout-graceful-shutdown", "30",
        "--timeout-keep-alive", "75", "--no-access-log", app,
    ]  # fmt: skip


def _granian(app: str) -> Callable[[int], list[str]]:
    # The flags of docs/servers.md, and a raised backpressure: Granian admits at most
    # backlog/workers concurrent requests per worker (1,024 here), and 5,000 streams
    # would queue behind it.
    return lambda port: [
        sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS),
        "--backlog", "2048", "--backpressure", "16384", "--respawn-failed-workers",
        "--workers-kill-timeout", "30", "--log-level", "warning", app,
    ]  # fmt: skip


SERVICE = "bench.stream_apps:service"
STACKS = {
    stack.name: stack
    for stack in (
        Stack("service-hypercorn", _hypercorn(SERVICE), ("hypercorn",)),
        Stack("service-serve", _serve(SERVICE), ("hypercorn",)),
        Stack("service-granian", _granian(SERVICE), ("granian",)),
        Stack("service-uvicorn", _uvicorn(SERVICE), ("uvicorn", "httptools")),
        Stack(
            "fastapi-uvicorn",
            _uvicorn("bench.stream_apps_fastapi:app"),
            ("uvicorn", "httptools", "fastapi", "sse_starlette"),
        ),
        Stack("bare-quart", _hypercorn("bench.stream_apps:bare"), ("hypercorn",)),
    )
}


@dataclass
class Running:
    """A started server: its main process and its worker processes."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    workers: list[int] = field(default_factory=list)

    def find_workers(self) -> list[int]:
        """The main process's children, less multiprocessing's resource tracker."""
        found = []
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                    if "resource_tracker" not in " ".join(child.cmdline()):
                        found.append(child.pid)
        return sorted(found)

    def stop(self) -> None:
        """SIGTERM to the main process by PID; SIGKILL to it and its workers after 15 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            wait_or_kill(self.process, lambda: self.workers, 15)


@contextlib.contextmanager
def running(stack: Stack, tmp: Path) -> Iterator[Running]:
    """Start ``stack`` on a free port, wait until both workers exist and it streams."""
    port = free_port()
    log_path = tmp / f"{stack.name}-{port}.log"
    env = {"QUART_SERVICE_DATA_DIR": str(tmp / f"data-{port}")}
    server = Running(launch(stack.argv(port), env, log_path), port, log_path)

    def ready() -> bool:
        server.workers = server.find_workers()
        if len(server.workers) != WORKERS:
            return False
        # Short streams over several connections: both workers answer and have
        # imported whatever they import on first use.
        warm_up = Load(port, streams=16, tokens=5, rate=100, stagger=0.2, timeout=10)
        return asyncio.run(_client(warm_up, time.monotonic())).completed == 16

    with started(server, stack.name, ready, timeout=60, every=0.2):
        yield server


# --- the load generator -------------------------------------------------------------


BUCKET = 0.1  # seconds: the client counts events per bucket, the parent samples /proc


@dataclass
class ClientResult:
    """What one client process saw; times in seconds (monotonic where absolute)."""

    completed: int = 0  # streams that ended with every event
    failed: int = 0
    events: int = 0
    first: array[float] = field(default_factory=lambda: array("d"))  # connect -> 1st event
    gaps: array[float] = field(default_factory=lambda: array("d"))  # between events
    gaps_at: array[float] = field(default_factory=lambda: array("d"))  # when each ended
    buckets: array[int] = field(default_factory=lambda: array("q"))  # events per BUCKET
    all_first: float = 0.0  # when the last stream got its first event
    first_end: float = float("inf")  # when the first stream got its last event
    ended: float = 0.0  # when the last stream ended
    cpu: float = 0.0  # this process's CPU seconds over the run


class _Stream(asyncio.Protocol):
    """One stream: counts ``data:`` in what arrives and timestamps each read."""

    def __init__(self, result: ClientResult, request: bytes, began: float, start_at: float) -> None:
        self.result, self.request, self.began, self.start_at = result, request, began, start_at
        self.events, self.last, self.tail, self.ok = 0, 0.0, b"", False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.tail:
            self.ok = data.startswith(b"HTTP/1.1 200")
        # An event's "data:" may be split across two reads: look at the seam too.
        count = data.count(b"data:") + (self.tail + data[:4]).count(b"data:")
        self.tail = data[-4:]
        if not count:
            return
        result = self.result
        if self.events:
            result.gaps.append(now - self.last)
            result.gaps_at.append(now)
        else:
            result.first.append(now - self.began)
            result.all_first = max(result.all_first, now)
        if count > 1:  # arrived in one read with the one before: no gap
            result.gaps.extend(_ZEROS[: count - 1])
            result.gaps_at.extend(array("d", [now]) * (count - 1))
        self.events += count
        self.last = now
        bucket = int((now - self.start_at) / BUCKET)
        if bucket < len(result.buckets):
            result.buckets[bucket] += count

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


_ZEROS = array("d", bytes(8 * 4096))


@dataclass(frozen=True)
class Load:
    """What one client process runs: streams ``offset, offset + every, ...`` of
    ``streams``, each of ``tokens`` events at ``rate``, started at their place in
    ``stagger`` seconds; every stream is cut ``timeout`` s after the last start."""

    port: int
    streams: int
    tokens: int
    rate: float
    stagger: float
    timeout: float
    offset: int = 0
    every: int = 1


async def _client(load: Load, start_at: float) -> ClientResult:
    """Run ``load`` from ``start_at`` (time.monotonic()) on the running loop."""
    loop = asyncio.get_running_loop()
    result = ClientResult()
    result.buckets.frombytes(bytes(8 * int((load.stagger + load.timeout) / BUCKET + 2)))
    request = (
        f"GET /tokens?n={load.tokens}&rate={load.rate:g} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{load.port}\r\nAccept: text/event-stream\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    transports: list[asyncio.Transport] = []

    async def one(index: int) -> None:
        await asyncio.sleep(start_at + load.stagger * index / load.streams - time.monotonic())
        began = time.monotonic()
        try:
            transport, stream = await loop.create_connection(
                lambda: _Stream(result, request, began, start_at), "127.0.0.1", load.port
            )
        except OSError:
            result.failed += 1
            return
        transports.append(transport)
        await stream.done
        result.events += stream.events
        if stream.ok and stream.events == load.tokens:
            result.completed += 1
            result.first_end = min(result.first_end, stream.last)
        else:
            result.failed += 1
        result.ended = max(result.ended, time.monotonic())

    cpu_before = _own_cpu()
    tasks = [asyncio.ensure_future(one(i)) for i in range(load.offset, load.streams, load.every)]
    deadline = start_at + load.stagger + load.timeout
    _, pending = await asyncio.wait(tasks, timeout=deadline - time.monotonic())
    for transport in transports:
        transport.abort()  # streams still open past the deadline
    if pending:
        await asyncio.wait(pending, timeout=5)
    result.cpu = _own_cpu() - cpu_before
    return result


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client_process(conn: Connection, load: Load) -> None:
    """A client process: raise the fd limit, use uvloop, wait for the start time."""
    import uvloop

    _raise_fd_limit()
    conn.send("ready")
    start_at: float = conn.recv()
    conn.send(uvloop.run(_client(load, start_at)))


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- one measurement ----------------------------------------------------------------


@dataclass
class Sample:
    """One stack at one N in one round (NaN where the run had no steady part)."""

    cpu_per_10k: float  # worker CPU seconds per 10,000 events, whole run
    steady_cpu_per_10k: float  # the same over the steady part (see measure)
    ms_per_stream: float  # worker CPU per stream beyond its events (set-up, teardown)
    events_per_s: float  # delivered over the steady part
    itl_p50_ms: float
    itl_p99_ms: float
    steady_itl_p99_ms: float  # gaps that ended within the steady part
    ttft_p50_ms: float
    ttft_p99_ms: float
    kib_per_stream: float
    client_core: float  # load generator CPU in % of one core
    client_per_10k: float  # load generator CPU seconds per 10,000 events
    others_cores: float  # CPU of every other process on the machine, in cores
    listen_overflows: int  # the kernel's (machine-wide) during the run
    completed: int
    failed: int


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy() -> float:
    """CPU seconds spent by all cores on anything but idle and I/O wait, from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full."""
    with open("/proc/net/netstat") as netstat:
        lines = [line.split() for line in netstat if line.startswith("TcpExt:")]
    return int(lines[1][lines[0].index("ListenOverflows")])


_TICK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Tick:
    """One sample of the workers and the machine."""

    at: float  # time.monotonic()
    cpu: float  # the workers' CPU seconds
    rss: int  # the workers' RSS bytes
    busy: float  # the machine's busy CPU seconds


@contextlib.contextmanager
def sampling(pids: list[int]) -> Iterator[list[Tick]]:
    """A :class:`Tick` every BUCKET seconds while the block runs, from a thread."""
    series: list[Tick] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            cpu = sum(cpu_seconds(pid) for pid in pids)
            rss = sum(rss_bytes(pid) for pid in pids)
            series.append(Tick(time.monotonic(), cpu, rss, machine_busy()))
            if stop.wait(BUCKET):
                return

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield series
    finally:
        stop.set()
        sampler.join()


def _at(series: list[Tick], moment: float, key: str) -> float:
    """``key`` of the series at ``moment``, interpolated between samples."""
    for before, after in itertools.pairwise(series):
        if before.at <= moment <= after.at:
            low, high = getattr(before, key), getattr(after, key)
            return float(low + (high - low) * (moment - before.at) / (after.at - before.at))
    raise ValueError("moment outside the samples")


def measure(
    server: Running, streams: int, rate: float, seconds: float, stagger: float, clients: int
) -> Sample:
    """Run ``streams`` paced streams against ``server`` from ``clients`` processes.

    The steady part of the run is from 0.5 s after the last stream got its first
    event until 0.2 s before the first stream got its last one (whole BUCKETs): every
    stream open, none starting or ending. Its worker CPU comes from the sampled
    series, its events from the clients' buckets.
    """
    tokens = round(rate * seconds) + 1
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for offset in range(clients):
        parent_end, child_end = context.Pipe()
        load = Load(
            server.port, streams, tokens, rate, stagger, timeout=seconds * 3 + 30,
            offset=offset, every=clients,
        )  # fmt: skip
        process = context.Process(target=_client_process, args=(child_end, load))
        process.start()
        pipes.append(parent_end)
        processes.append(process)
    try:
        for pipe in pipes:
            if not pipe.poll(30) or pipe.recv() != "ready":
                raise RuntimeError("a client process did not start")
        idle_rss = sum(rss_bytes(pid) for pid in server.workers)
        overflows = listen_overflows()
        own_cpu = _own_cpu()
        with sampling(server.workers) as series:
            start_at = time.monotonic() + 0.2
            for pipe in pipes:
                pipe.send(start_at)
            results: list[ClientResult] = []
            for pipe in pipes:
                if not pipe.poll(seconds * 3 + 60):
                    raise RuntimeError("a client process did not finish")
                results.append(pipe.recv())
            time.sleep(2 * BUCKET)  # a sample after the last end
        own_cpu = _own_cpu() - own_cpu  # this process: the sampler, mostly
        overflows = listen_overflows() - overflows
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    events = sum(r.events for r in results)
    cpu = series[-1].cpu - _at(series, start_at, "cpu")
    client_cpu = sum(r.cpu for r in results)
    elapsed = max(max(r.ended for r in results) - start_at, 1e-9)
    busy = series[-1].busy - _at(series, start_at, "busy")
    others = (busy - cpu - client_cpu - own_cpu) / (series[-1].at - start_at)
    gaps, gaps_at, first = array("d"), array("d"), array("d")
    for r in results:
        gaps.extend(r.gaps)
        gaps_at.extend(r.gaps_at)
        first.extend(r.first)
    # The steady part, in whole buckets.
    begin = math.ceil((max(r.all_first for r in results) + 0.5 - start_at) / BUCKET)
    end = math.floor((min(r.first_end for r in results) - 0.2 - start_at) / BUCKET)
    steady_cpu = steady_events = steady_rate = float("nan")
    steady_gaps: list[float] = []
    open_rss = max(tick.rss for tick in series)
    if end - begin >= 5:
        steady_events = sum(sum(r.buckets[begin:end]) for r in results)
        t0, t1 = start_at + begin * BUCKET, start_at + end * BUCKET
        steady_cpu = _at(series, t1, "cpu") - _at(series, t0, "cpu")
        steady_rate = steady_events / (t1 - t0)
        open_rss = int(median(tick.rss for tick in series if t0 <= tick.at <= t1))
        steady_gaps = [gap for gap, at in zip(gaps, gaps_at, strict=True) if t0 <= at < t1]
    per_event = steady_cpu / max(steady_events, 1)
    per_10k = 10_000 / max(events, 1)
    return Sample(
        cpu_per_10k=cpu * per_10k,
        steady_cpu_per_10k=per_event * 10_000,
        ms_per_stream=(cpu - per_event * events) / streams * 1000,
        events_per_s=steady_rate,
        itl_p50_ms=percentile(gaps, 0.50) * 1000,
        itl_p99_ms=percentile(gaps, 0.99) * 1000,
        steady_itl_p99_ms=percentile(steady_gaps, 0.99) * 1000,
        ttft_p50_ms=percentile(first, 0.50) * 1000,
        ttft_p99_ms=percentile(first, 0.99) * 1000,
        kib_per_stream=(open_rss - idle_rss) / 1024 / streams,
        client_core=client_cpu / elapsed * 100,
        client_per_10k=client_cpu * per_10k,
        others_cores=others,
        listen_overflows=overflows,
        completed=sum(r.completed for r in results),
        failed=sum(r.failed for r in results),
    )


# --- the run and its tables ---------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One load of the run: ``streams`` streams at ``rate`` tokens/s, started evenly
    over ``stagger`` seconds."""

    streams: int
    rate: float
    stagger: float


def run(
    stacks: list[Stack], points: list[Point], seconds: float, rounds: int, clients: int
) -> dict[tuple[str, int], list[Sample]]:
    """Every point over every stack, ``rounds`` times, stacks rotating each round."""
    samples: dict[tuple[str, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(rounds):
            for point_no, point in enumerate(points):
                streams, rate, stagger = point.streams, point.rate, point.stagger
                # Rotate the order, so no stack always runs first (or last).
                shift = (round_no * len(points) + point_no) % len(stacks)
                for stack in stacks[shift:] + stacks[:shift]:
                    with running(stack, Path(tmp)) as server:
                        sample = measure(server, streams, rate, seconds, stagger, clients)
                    samples.setdefault((stack.name, streams), []).append(sample)
                    print(
                        f"round {round_no + 1} N={streams:<5} R={rate:g}/s {stack.name:18} "
                        f"CPU/10k ev {sample.cpu_per_10k:5.2f} s (steady "
                        f"{sample.steady_cpu_per_10k:5.2f}, {sample.ms_per_stream:4.2f} ms "
                        f"per stream) {sample.events_per_s:6.0f} ev/s ITL p50/p99 "
                        f"{sample.itl_p50_ms:.0f}/{sample.itl_p99_ms:.0f} ms (steady p99 "
                        f"{sample.steady_itl_p99_ms:.0f}) TTFT p50/p99 "
                        f"{sample.ttft_p50_ms:.1f}/{sample.ttft_p99_ms:.0f} ms "
                        f"{sample.kib_per_stream:.1f} KiB/stream; client "
                        f"{sample.client_core:.0f}% of a core; others "
                        f"{sample.others_cores:.2f} cores; {sample.listen_overflows} listen "
                        f"overflows; {sample.completed}/{streams} complete",
                        flush=True,
                    )
    return samples


_COLUMNS = (
    ("stack", 18, None),
    ("CPU s/10k ev", 12, "cpu_per_10k"),
    ("steady", 6, "steady_cpu_per_10k"),
    ("ms/stream", 9, "ms_per_stream"),
    ("events/s", 8, "events_per_s"),
    ("ITL p50", 7, "itl_p50_ms"),
    ("ITL p99", 7, "itl_p99_ms"),
    ("steady p99", 10, "steady_itl_p99_ms"),
    ("TTFT p50", 8, "ttft_p50_ms"),
    ("TTFT p99", 8, "ttft_p99_ms"),
    ("KiB/stream", 10, "kib_per_stream"),
    ("client %core", 12, "client_core"),
    ("client s/10k", 12, "client_per_10k"),
    ("others cores", 12, "others_cores"),
    ("overflows", 9, "listen_overflows"),
    ("complete", 8, "completed"),
)
_WHOLE = ("events_per_s", "itl_p50_ms", "itl_p99_ms", "steady_itl_p99_ms", "ttft_p50_ms",
          "ttft_p99_ms", "client_core", "listen_overflows", "completed")  # fmt: skip


def _median(samples: list[Sample], key: str) -> float:
    """The median of ``key`` over the rounds that have it (NaN: no steady part)."""
    values = [getattr(s, key) for s in samples if not math.isnan(getattr(s, key))]
    return float(median(values)) if values else float("nan")


def report(
    samples: dict[tuple[str, int], list[Sample]], stacks: list[Stack],
    points: list[Point], seconds: float, rounds: int,
) -> None:  # fmt: skip
    """One table per N (medians over rounds), then the target ratios."""
    for point in points:
        streams, rate = point.streams, point.rate
        print(
            f"\nN = {streams:,} streams x {rate:g} tokens/s ({streams * rate:,.0f} events/s "
            f"offered, ideal ITL {1000 / rate:.0f} ms), {seconds:g} s each, started over "
            f"{point.stagger:g} s; median of {rounds} round(s). CPU: worker seconds per 10,000 "
            "events (whole run; steady part) and ms per stream beyond its events; "
            "latencies in ms"
        )
        print(" ".join(f"{title:>{width}}" for title, width, _ in _COLUMNS))
        for stack in stacks:
            rows = samples[(stack.name, streams)]
            cells = [f"{stack.name:>18}"]
            for _, width, key in _COLUMNS[1:]:
                value = _median(rows, key) if key else 0.0
                digits = 0 if key in _WHOLE else 2
                cells.append(f"{value:>{width},.{digits}f}")
            print(" ".join(cells))
    names = {stack.name for stack in stacks}
    services = [n for n in names if n.startswith("service-")]
    if "fastapi-uvicorn" not in names or not services:
        return
    print("\nservice / fastapi-uvicorn (targets: CPU per event <= 0.8 under the fastest "
          "server; ITL p99 at 1,000 streams <= 1.0)")  # fmt: skip
    for point in points:
        streams = point.streams
        theirs = samples[("fastapi-uvicorn", streams)]
        fastest = min(services, key=lambda n: _median(samples[(n, streams)], "cpu_per_10k"))
        for name in sorted(services):
            ours = samples[(name, streams)]
            cpu, steady, itl, steady_itl = (
                _median(ours, key) / _median(theirs, key)
                for key in ("cpu_per_10k", "steady_cpu_per_10k", "itl_p99_ms", "steady_itl_p99_ms")
            )
            mark = ", the fastest server" if name == fastest else ""
            verdict = "ok" if cpu <= 0.8 else "above"
            itl_note = (" " + ("ok" if itl <= 1.0 else "above")) if streams == 1000 else ""
            print(f"  N={streams:<5} {name:18} CPU per event {cpu:5.2f}x ({verdict}{mark}; "
                  f"steady {steady:5.2f}x), ITL p99 {itl:5.2f}x{itl_note} "
                  f"(steady {steady_itl:5.2f}x)")  # fmt: skip


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default=",".join(map(str, DEFAULT_STREAMS)),
                        help="comma-separated stream counts")  # fmt: skip
    parser.add_argument("--rate", default=None,
                        help="tokens/s per stream: one value for every N, or one per N "
                             "(default: 20, at most 10,000 events/s in all)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each stream")
    parser.add_argument("--stagger", type=float, default=None,
                        help="seconds the starts are spread over (default: 1 s per 1,000 "
                             "streams, at least 1 s)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--stacks", default=",".join(STACKS), help="comma-separated")
    parser.add_argument("--quick", action="store_true",
                        help="100 and 1,000 streams, 5 s, one round")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.streams, args.seconds, args.rounds = "100,1000", 5.0, 1
    counts = [int(n) for n in args.streams.split(",") if n]
    if args.rate is not None:
        rates = _floats(args.rate)
    else:
        rates = [min(DEFAULT_RATE, MAX_EVENTS_PER_S / n) for n in counts]
    if len(rates) == 1:
        rates *= len(counts)
    if len(rates) != len(counts):
        sys.exit("--rate takes one value, or one per --streams count")
    stacks = []
    for name in args.stacks.split(","):
        if name not in STACKS:
            sys.exit(f"unknown stack {name!r}; known: {', '.join(STACKS)}")
        missing = STACKS[name].missing()
        if missing:
            print(f"skipping {name}: {', '.join(missing)} not installed "
                  "(pip install -e '.[bench]')")  # fmt: skip
        else:
            stacks.append(STACKS[name])
    if not stacks:
        sys.exit("no stack to run")
    points = [
        Point(n, rate, args.stagger or max(1.0, n / STARTS_PER_S))
        for n, rate in zip(counts, rates, strict=True)
    ]
    for point in points:
        if args.seconds < point.stagger + 2:
            sys.exit(f"--seconds must be at least {point.stagger + 2:g} for {point.streams} "
                     "streams (the starts' spread + 2 s), for a steady part")  # fmt: skip
    _raise_fd_limit()  # the servers inherit it
    samples = run(stacks, points, args.seconds, args.rounds, args.clients)
    report(samples, stacks, points, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
