"""Tens of thousands of idle SSE streams held open on one host: memory, heartbeats, liveness.

    python -m bench.idle_streams --streams 20000 --hold 10
    python -m bench.idle_streams --streams 20000 --gc          # the workers' GC pauses
    python -m bench.idle_streams --streams 1000 --breakdown    # where the memory goes

For each stack (the service; bare Quart with hand-written heartbeats; the same stream
as a raw ASGI app, Hypercorn alone; all on the shipped hypercorn.toml with 2 workers)
it opens ``--streams`` connections to ``/idle``: one event, then only heartbeats. The
connections come from ``--clients`` processes, each a uvloop loop of raw protocols (a
few hundred bytes per connection), opened at ``--rate`` per second with at most
``--window`` waiting for their first event, so the listen backlog (2048 in
hypercorn.toml) never overflows. Once all are open it reports how many streams
received a heartbeat within two intervals, the workers' resident memory per stream
(against the same workers before the streams), how the streams split over the
workers, the latency of a probe request (``/livez`` for the service) from another
process while they are held, the workers' CPU per heartbeat, and the clients' own CPU.
``--gc`` and ``--breakdown`` run the apps through :mod:`bench.memdebug`.

File descriptors: each held stream is one descriptor in a worker and one in a client.
The bench raises its own ``RLIMIT_NOFILE`` before starting the server (the workers
inherit it) and each client raises its own. Up to the hard limit (``ulimit -Hn``) any
user may; past it only a process with CAP_SYS_RESOURCE (root, unless a container
dropped it), so otherwise the streams must be spread: one client per 10,000, and a
worker holds at most the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from quart_service.observability.proc import rss_bytes
from tests.support.other_servers import OTHER_SERVERS, Kind, running_other_server
from tests.support.server import SHIPPED_CONFIG, Server, running_server, wait_for

HEARTBEAT = 2.0
_REQUEST = b"GET /idle HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
_EVENT = b"data: "
_BEAT = b": keep-alive"
_TAIL = len(_BEAT) - 1  # bytes kept between reads: a marker split over two reads
# IP_BIND_ADDRESS_NO_PORT (Linux 4.2): bind a source address but choose the port at
# connect(), by the whole 4-tuple, so each 127.0.0.x has the whole ephemeral range.
_BIND_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_FD_SLACK = 1024  # descriptors a process needs besides its connections


# -- file descriptors and ports ------------------------------------------------------------


def raise_nofile(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE towards ``needed`` and return the soft limit
    now in force (children inherit it). Past the hard limit (``ulimit -Hn``) only a
    process with CAP_SYS_RESOURCE may go (root, unless a container dropped it); without
    it the limit stops at the hard one and the caller must spread its sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return needed


def ephemeral_ports() -> int:
    """How many local ports connect() can choose from (per source address)."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(high) - int(low) + 1


def source_addresses(streams: int, ports: int) -> tuple[str, ...]:
    """Source addresses for ``streams`` connections to one port: 127.0.0.1 alone while
    they fit in the ephemeral range (with a quarter of it left to the rest of the
    machine), else as many 127.0.0.x as it takes."""
    count = max(1, math.ceil(streams / (ports * 3 // 4)))
    return tuple(f"127.0.0.{n}" for n in range(1, count + 1))


def listen_counters() -> dict[str, int]:
    """The kernel's ListenOverflows and ListenDrops (whole network namespace)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return {key: int(table[key]) for key in ("ListenOverflows", "ListenDrops")}
    return {"ListenOverflows": 0, "ListenDrops": 0}


def accept_queue(port: int) -> tuple[int, int] | None:
    """The listening socket's accept queue: (waiting now, backlog), from ``ss``."""
    result = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False
    )
    fields = result.stdout.split()
    if len(fields) < 3:
        return None
    return int(fields[1]), int(fields[2])


@contextlib.contextmanager
def peak_accept_queue(port: int, every: float = 0.05) -> Iterator[dict[str, int]]:
    """Sample the accept queue of ``port`` while the block runs (peak and backlog)."""
    seen = {"peak": 0, "backlog": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            queue = accept_queue(port)
            if queue is not None:
                seen["peak"] = max(seen["peak"], queue[0])
                seen["backlog"] = queue[1]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()


def socket_count(pid: int) -> int:
    """How many sockets process ``pid`` has open."""
    count = 0
    with os.scandir(f"/proc/{pid}/fd") as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if os.readlink(entry.path).startswith("socket:"):
                    count += 1
    return count


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of ``pid`` so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the client: one process holding a share of the streams --------------------------------


@dataclass(frozen=True)
class ClientSpec:
    """What one client process opens, and how fast."""

    port: int
    count: int
    rate: float  # connections opened per second
    window: int  # at most this many opened and still waiting for their first event
    sources: tuple[str, ...]
    heartbeat: float
    open_timeout: float = 300.0


class _Stream(asyncio.Protocol):
    """One held connection: sends the request, then only looks for two markers."""

    __slots__ = ("_client", "_tail", "beaten", "evented", "transport")

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._tail = b""
        self.evented = False
        self.beaten = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.write(_REQUEST)

    def data_received(self, data: bytes) -> None:
        buffer = self._tail + data
        if not self.evented:
            at = buffer.find(_EVENT)
            if at < 0:
                self._tail = buffer[-_TAIL:]
                return
            self.evented = True
            buffer = buffer[at + len(_EVENT) :]
            self._client.on_event()
        if not self.beaten and self._client.marked_at is not None and _BEAT in buffer:
            self.beaten = True
            self._client.on_beat()
        self._tail = buffer[-_TAIL:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.on_lost(self)


class _Client:
    def __init__(self, loop: asyncio.AbstractEventLoop, spec: ClientSpec) -> None:
        self.loop = loop
        self.spec = spec
        self.streams: set[_Stream] = set()
        self.opened = self.evented = self.failed = self.lost = 0
        self.beats_in_window = self.beats_late = 0
        self.errors: Counter[str] = Counter()
        self.marked_at: float | None = None
        self.stopping = False
        self._pending = 0
        self._room: asyncio.Future[None] | None = None
        self._all_open: asyncio.Future[None] = loop.create_future()
        self._connecting: set[asyncio.Task[None]] = set()

    async def open_all(self) -> None:
        """Open every connection and wait for their first events, or until the
        spec's ``open_timeout`` (what was reached is reported either way)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._open_all(), self.spec.open_timeout)

    async def _open_all(self) -> None:
        spec, loop = self.spec, self.loop
        tick = 0.01  # open in small batches: a timer per connection costs more
        per_tick = max(1, round(spec.rate * tick))
        started = loop.time()
        for ident in range(spec.count):
            while self._pending >= spec.window:
                self._room = loop.create_future()
                await self._room
            if ident % per_tick == 0:
                due = started + ident / spec.rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            self._pending += 1
            task = loop.create_task(self._connect(spec.sources[ident % len(spec.sources)]))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        self._check_all_open()
        await self._all_open

    async def _connect(self, source: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if source != "127.0.0.1":
                sock.setsockopt(socket.IPPROTO_IP, _BIND_NO_PORT, 1)
                sock.bind((source, 0))
            await self.loop.sock_connect(sock, ("127.0.0.1", self.spec.port))
            _, stream = await self.loop.create_connection(lambda: _Stream(self), sock=sock)
        except OSError as exc:
            sock.close()
            self.errors[type(exc).__name__ + (f" {exc.errno}" if exc.errno else "")] += 1
            self.failed += 1
            self._released()
            return
        self.opened += 1
        self.streams.add(stream)

    def _released(self) -> None:
        self._pending -= 1
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)
        self._check_all_open()

    def _check_all_open(self) -> None:
        if self.evented + self.failed >= self.spec.count and not self._all_open.done():
            self._all_open.set_result(None)

    def on_event(self) -> None:
        self.evented += 1
        self._released()

    def on_beat(self) -> None:
        assert self.marked_at is not None
        if self.loop.time() - self.marked_at <= 2 * self.spec.heartbeat:
            self.beats_in_window += 1
        else:
            self.beats_late += 1

    def on_lost(self, stream: _Stream) -> None:
        self.streams.discard(stream)
        if not stream.evented:
            self.failed += 1
            self.errors["closed before the first event"] += 1
            self._released()
        elif not self.stopping:
            self.lost += 1

    def counts(self) -> dict[str, Any]:
        return {
            "opened": self.opened,
            "first_event": self.evented,
            "failed": self.failed,
            "lost": self.lost,
            "heartbeats": self.beats_in_window,
            "heartbeats_late": self.beats_late,
            "errors": dict(self.errors),
        }


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _client_session(pipe: Connection, spec: ClientSpec) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: inbox.put_nowait(pipe.recv()))
    client = _Client(loop, spec)
    pipe.send(("ready", {}))
    await inbox.get()  # go
    began, cpu = loop.time(), _cpu_now()
    await client.open_all()
    pipe.send(
        ("open", {**client.counts(), "open_s": loop.time() - began, "cpu_open": _cpu_now() - cpu})
    )
    await inbox.get()  # mark: all clients have all their streams open
    client.marked_at, cpu = loop.time(), _cpu_now()
    await asyncio.sleep(2 * spec.heartbeat + 0.1)
    held_s, cpu_held = loop.time() - client.marked_at, _cpu_now() - cpu
    pipe.send(("beats", {**client.counts(), "held_s": held_s, "cpu_held": cpu_held}))
    await inbox.get()  # stop
    client.stopping = True
    for stream in list(client.streams):
        if stream.transport is not None:
            stream.transport.abort()
    await asyncio.sleep(0.2)
    pipe.send(("done", {**client.counts(), "cpu": _cpu_now()}))
    loop.remove_reader(pipe.fileno())


def _client_main(pipe: Connection, spec: ClientSpec) -> None:
    import uvloop

    raise_nofile(spec.count + _FD_SLACK)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its clients
    uvloop.run(_client_session(pipe, spec))


@dataclass
class _Clients:
    """The client processes and their pipes."""

    processes: list[BaseProcess] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)

    def send(self, message: str) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def expect(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        answers = []
        deadline = time.monotonic() + timeout
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            while not pipe.poll(0.1):
                if not process.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"client {process.pid} sent no {kind!r} (exit {process.exitcode})"
                    )
            got, body = pipe.recv()
            if got != kind:
                raise RuntimeError(f"client {process.pid} sent {got!r}, expected {kind!r}")
            answers.append(body)
        return answers

    def stop(self) -> None:
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self.pipes:
            pipe.close()


@contextlib.contextmanager
def _clients(specs: list[ClientSpec]) -> Iterator[_Clients]:
    context = multiprocessing.get_context("spawn")
    clients = _Clients()
    try:
        for spec in specs:
            ours, theirs = context.Pipe()
            process = context.Process(target=_client_main, args=(theirs, spec), daemon=True)
            process.start()
            theirs.close()
            clients.processes.append(process)
            clients.pipes.append(ours)
        yield clients
    finally:
        clients.stop()


# -- the measurement ------------------------------------------------------------------------


def _client_count(streams: int) -> int:
    """One client per 10,000 streams, more if the descriptor limit asks for it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_client = 10_000 if hard == resource.RLIM_INFINITY else min(10_000, hard - _FD_SLACK)
    return max(1, math.ceil(streams / per_client))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


async def measure(
    server: Server,
    probe_path: str,
    streams: int,
    hold: float,
    probes: int = 100,
    *,
    clients: int = 0,
    sources: int = 0,
    rate: float = 2000.0,
    window: int = 1000,
    heartbeat: float = HEARTBEAT,
    on_held: Any = None,
) -> dict[str, Any]:
    """Hold ``streams`` idle streams on ``server`` (heartbeat every ``heartbeat`` s);
    heartbeats, memory, split over workers, probe latency, CPU. ``clients``: how many
    client processes (0: one per 10,000 streams); ``sources``: how many client
    addresses 127.0.0.x (0: as the ephemeral port range needs). ``on_held(pids)`` runs
    while the streams are held, before they close."""
    return await asyncio.to_thread(
        _measure,
        server,
        probe_path,
        streams,
        hold,
        probes,
        clients or _client_count(streams),
        sources,
        rate,
        window,
        heartbeat,
        on_held,
    )


def _measure(
    server: Server,
    probe_path: str,
    streams: int,
    hold: float,
    probes: int,
    client_count: int,
    source_count: int,
    rate: float,
    window: int,
    heartbeat: float,
    on_held: Any,
) -> dict[str, Any]:
    pids = server.worker_pids()
    base_rss = {pid: rss_bytes(pid) for pid in pids}
    base_sockets = {pid: socket_count(pid) for pid in pids}
    sources = source_addresses(streams, ephemeral_ports())
    if source_count:
        sources = tuple(f"127.0.0.{n}" for n in range(1, source_count + 1))
    specs = [
        ClientSpec(
            server.port,
            share,
            rate / client_count,
            max(1, window // client_count),
            sources,
            heartbeat,
        )
        for share in _split(streams, client_count)
    ]
    listen_before = listen_counters()
    with _clients(specs) as group:
        group.expect("ready", 60)
        cpu_go = {pid: cpu_seconds(pid) for pid in pids}
        go_at = time.time()
        with peak_accept_queue(server.port) as queue:
            group.send("go")
            opened = group.expect("open", specs[0].open_timeout + 30)
        cpu_open = sum(cpu_seconds(pid) - cpu_go[pid] for pid in pids)
        listen_after = listen_counters()
        cpu_mark = {pid: cpu_seconds(pid) for pid in pids}
        mark, mark_at = time.monotonic(), time.time()
        group.send("mark")
        beats = group.expect("beats", 2 * heartbeat + 30)
        time.sleep(max(0.0, hold - (time.monotonic() - mark)))
        held_rss = {pid: rss_bytes(pid) for pid in pids}
        held_sockets = {pid: socket_count(pid) for pid in pids}
        cpu_held = {pid: cpu_seconds(pid) - cpu_mark[pid] for pid in pids}
        held_for = time.monotonic() - mark
        probe_at = time.time()
        latencies, answered_by = _probe_path(server.url, probe_path, probes)
        probed_at = time.time()
        if on_held is not None:
            on_held(pids)
        group.send("stop")
        done = group.expect("done", 60)
    wait_for(
        lambda: all(socket_count(pid) <= base_sockets[pid] + 2 for pid in pids),
        "the workers closed the streams",
        timeout=60,
    )
    time.sleep(0.5)
    after_rss = {pid: rss_bytes(pid) for pid in pids}

    first_event = sum(row["first_event"] for row in opened)
    added = sum(held_rss.values()) - sum(base_rss.values())
    beats_sent = first_event * held_for / heartbeat
    latencies.sort()
    return {
        "streams": streams,
        "clients": client_count,
        "sources": len(sources),
        "opened": sum(row["opened"] for row in opened),
        "first_event": first_event,
        "failed": sum(row["failed"] for row in opened),
        "heartbeats": sum(row["heartbeats"] for row in beats),
        "lost": sum(row["lost"] for row in done),
        "errors": dict(sum((Counter(row["errors"]) for row in done), Counter())),
        "opened_in_s": max(row["open_s"] for row in opened),
        "listen_overflows": listen_after["ListenOverflows"] - listen_before["ListenOverflows"],
        "listen_drops": listen_after["ListenDrops"] - listen_before["ListenDrops"],
        "accept_queue_peak": queue["peak"],
        "backlog": queue["backlog"],
        "rss_base_mb": sum(base_rss.values()) / 2**20,
        "rss_held_mb": sum(held_rss.values()) / 2**20,
        "rss_after_mb": sum(after_rss.values()) / 2**20,
        "kib_per_stream": added / 1024 / max(first_event, 1),
        "worker_cpu_open_s": cpu_open,
        "split": [held_sockets[pid] - base_sockets[pid] for pid in pids],
        "split_kib_per_stream": [
            (held_rss[pid] - base_rss[pid]) / 1024 / max(held_sockets[pid] - base_sockets[pid], 1)
            for pid in pids
        ],
        "worker_cpu_held_pct": sum(cpu_held.values()) / held_for * 100,
        "worker_us_per_heartbeat": sum(cpu_held.values()) / max(beats_sent, 1) * 1e6,
        "probe_p50_ms": latencies[len(latencies) // 2] * 1000,
        "probe_p99_ms": latencies[math.ceil(len(latencies) * 0.99) - 1] * 1000,
        "probe_max_ms": latencies[-1] * 1000,
        "probe_split": sorted(Counter(answered_by).values(), reverse=True),
        "client_cpu_open_s": sum(row["cpu_open"] for row in opened),
        "client_cpu_held_pct": sum(row["cpu_held"] / row["held_s"] for row in beats) * 100,
        "client_cpu_s": sum(row["cpu"] for row in done),
        # Wall-clock phases, to place what the workers log (bench.memdebug).
        "phases": {
            "while opening": (go_at, mark_at),
            "while held": (mark_at, probed_at),
            "while probing": (probe_at, probed_at),
        },
    }


# The probe runs in its own process: the holding clients' event loops, busy with
# thousands of sockets, must not add their own delays to the measured latency. Each
# probe is a new connection, as a kubelet's or load balancer's is, so both workers
# answer some (the connection goes to whichever worker accepts it).
_PROBE = """
import json, socket, sys, time
port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
request = f"GET {path} HTTP/1.1\\r\\nHost: probe\\r\\nConnection: close\\r\\n\\r\\n".encode()
latencies, pids = [], []
for _ in range(count):
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    latencies.append(time.perf_counter() - began)
    head, _, body = answer.partition(b"\\r\\n\\r\\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    pids.append(json.loads(body).get("pid"))
    time.sleep(0.02)
print(json.dumps([latencies, pids]))
"""


def _probe_path(url: str, path: str, count: int) -> tuple[list[float], list[int]]:
    port = url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, port, path, str(count)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60 + count,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the probe failed:\n{result.stderr}")
    latencies, pids = json.loads(result.stdout)
    return latencies, pids


# -- where the memory goes ------------------------------------------------------------------


def _memory_snapshot(folder: Path, pids: list[int], suffix: str) -> None:
    """Have bench.memdebug take a snapshot in each worker (the first: the baseline),
    and wait for the files it writes."""
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    wait_for(
        lambda: all((folder / f"{pid}{suffix}").exists() for pid in pids),
        "the workers took their memory snapshots",
        timeout=300,
    )


def _pause(rows: list[list[float]]) -> str:
    """The longest of some collections: wall ms (CPU ms)."""
    if not rows:
        return "-"
    longest = max(rows, key=lambda row: row[2])
    return f"{longest[2] * 1000:,.1f} ms ({longest[3] * 1000:,.1f} CPU)"


def _print_breakdown(
    folder: Path, streams: int, name: str, phases: dict[str, tuple[float, float]]
) -> None:
    reports = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    print(f"\n{name}: {streams:,} streams held over {len(reports)} workers")
    for report in reports:
        wall, cpu = report["gc_collect"]
        print(
            f"  worker {report['pid']}: {report['gc_tracked']:,} gc-tracked objects; "
            f"gc.collect() while held took {wall * 1000:,.0f} ms ({cpu * 1000:,.0f} ms CPU); "
            f"this report took {report['report_s']:,.1f} s"
        )
        for phase, (start, end) in phases.items():
            pauses = [row for row in report["gc_pauses"] if start <= row[1] < end]
            young = [row for row in pauses if row[0] < 2]
            full = [row for row in pauses if row[0] == 2]
            print(
                f"    collections {phase}: young {len(young)}, full {len(full)}; "
                f"longest young {_pause(young)}, longest full {_pause(full)}, "
                f"all full {sum(row[2] for row in full) * 1000:,.0f} ms"
            )
    types: Counter[str] = Counter()
    for report in reports:
        types.update(report["types"])
    print(f"  gc-tracked objects added, per stream: {sum(types.values()) / streams:,.1f}; by type:")
    kinds = [(kind, count / streams) for kind, count in types.most_common()]
    shown = [f"{kind.rsplit('.', 1)[-1]} {per:.1f}" for kind, per in kinds if per >= 0.5]
    for start in range(0, len(shown), 6):
        print("    " + ", ".join(shown[start : start + 6]))
    if "traced" not in reports[0]:
        return
    lines: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for report in reports:
        for line, (size, count) in report["lines"].items():
            lines[line] += size
            counts[line] += count
    modules: Counter[str] = Counter()
    for line, size in lines.items():
        modules[line.split(" via ", 1)[0].rsplit(":", 1)[0]] += size
    traced = sum(report["traced"] for report in reports)
    print(f"  traced Python memory added, per stream: {traced / streams:,.0f} B")
    print("  by the module that asked for it (bytes per stream; asyncio's objects charged")
    print("  to their creator):")
    for module, size in sorted(modules.items(), key=lambda item: -item[1]):
        if abs(size) / streams >= 16:
            print(f"    {size / streams:>8,.0f}  {module}")
    print("  by line (bytes / allocations per stream):")
    for line, size in lines.most_common(45):
        if abs(size) / streams >= 16:
            print(f"    {size / streams:>8,.0f} {counts[line] / streams:>6.2f}  {line}")


# -- command line ---------------------------------------------------------------------------


def _table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"{'':24}" + "".join(f"{name:>22}" for name in rows))
    for key in next(iter(rows.values())):
        cells = []
        for name in rows:
            value = rows[name][key]
            if isinstance(value, float):
                cells.append(f"{value:>22,.1f}")
            elif isinstance(value, int):
                cells.append(f"{value:>22,}")
            elif isinstance(value, list):
                cells.append(f"{' / '.join(f'{v:,.0f}' for v in value):>22}")
            else:
                cells.append(f"{json.dumps(value):>22}")
        print(f"{key:24}" + "".join(cells))


def _serving(
    server: str, command: str, tmp: Path, app: str, env: dict[str, str]
) -> contextlib.AbstractContextManager[Server]:
    if server == "hypercorn":
        return running_server(tmp, app=app, env=env, config=SHIPPED_CONFIG, command=command)
    kind: Kind = "granian" if server == "granian" else "uvicorn"
    # Uvicorn's default backlog (2048) is hypercorn.toml's; its access log is off here
    # as the service's is. Granian admits backlog / workers requests at once unless
    # told (docs/servers.md): 1,024, where a worker here holds 10,000 streams.
    extra = (
        ["--no-access-log"]
        if kind == "uvicorn"
        else ["--backlog", "2048", "--backpressure", "16384"]
    )
    return running_other_server(kind, tmp, app=app, env=env, extra=extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20_000)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds held once open")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--clients", type=int, default=0, help="0: one per 10,000 streams")
    parser.add_argument(
        "--sources", type=int, default=0, help="client addresses 127.0.0.1..N (0: as needed)"
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="opens per second")
    parser.add_argument("--window", type=int, default=1000, help="opens awaiting an event")
    parser.add_argument("--heartbeat", type=float, default=HEARTBEAT)
    parser.add_argument(
        "--stacks", default="service,bare-tuned,asgi", help="comma-separated, of these three"
    )
    parser.add_argument("--command", choices=("hypercorn", "serve"), default="hypercorn")
    parser.add_argument(
        "--server",
        choices=("hypercorn", *OTHER_SERVERS),
        default="hypercorn",
        help="granian or uvicorn: that server's own command line (docs/servers.md), "
        "2 workers; the asgi stack stays on Hypercorn's numbers",
    )
    parser.add_argument(
        "--gc",
        action="store_true",
        help="time the workers' garbage collections and count their objects by type",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="--gc, and trace the workers' allocations (slow: use a few thousand streams)",
    )
    args = parser.parse_args()
    # The workers inherit this limit; with an uneven split one worker may hold all.
    limit = raise_nofile(args.streams + _FD_SLACK)
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    print(
        f"RLIMIT_NOFILE {limit} per process (workers inherit it); ephemeral ports "
        f"{ephemeral_ports()}; backlog 2048 (hypercorn.toml), somaxconn {somaxconn}"
    )
    if limit < args.streams + _FD_SLACK:
        print(
            f"note: the hard limit could not be raised (no CAP_SYS_RESOURCE): a worker "
            f"can hold about {limit - _FD_SLACK:,} streams, so the split must be that even"
        )
    # name: (the app, the same app wrapped by bench.memdebug, the probe's path)
    stacks = {
        "service": ("bench.apps:service", "bench.memdebug:service", "/livez"),
        "bare-tuned": ("bench.apps:bare", "bench.memdebug:bare", "/hello"),
        "asgi": ("bench.idle_asgi:app", "bench.memdebug:asgi", "/pid"),
    }
    rows = {}
    for name in args.stacks.split(","):
        app, debug_app, probe = stacks[name]
        env = {
            "QUART_SERVICE_STREAM_HEARTBEAT": str(args.heartbeat),
            "QUART_SERVICE_STREAM_IDLE_TIMEOUT": "0",
            "QUART_SERVICE_ACCESS_LOG": "0",
        }
        with tempfile.TemporaryDirectory() as tmp:
            on_held = None
            folder = Path(tmp) / "memdebug"
            debug = args.gc or args.breakdown
            if debug:
                folder.mkdir()
                app = debug_app
                env["BENCH_MEMDEBUG"] = str(folder)
                env["BENCH_MEMDEBUG_TRACE"] = "1" if args.breakdown else "0"
            with _serving(args.server, args.command, Path(tmp), app, env) as server:
                if debug:
                    _memory_snapshot(folder, server.worker_pids(), ".base")
                    on_held = functools.partial(_memory_snapshot, folder, suffix=".json")
                rows[name] = asyncio.run(
                    measure(
                        server,
                        probe,
                        args.streams,
                        args.hold,
                        args.probes,
                        clients=args.clients,
                        sources=args.sources,
                        rate=args.rate,
                        window=args.window,
                        heartbeat=args.heartbeat,
                        on_held=on_held,
                    )
                )
            phases = rows[name].pop("phases")
            if debug:
                _print_breakdown(folder, rows[name]["first_event"], name, phases)
    print()
    _table(rows)


if __name__ == "__main__":
    main()
