"""``quart-service serve`` spreads connections over its workers, with real processes.

Each worker accepts on its own ``SO_REUSEPORT`` socket, so the kernel, not the worker
that wakes first, picks the worker of a new connection. A worker that stops accepting
(rolling restart, a SIGTERM to it alone) leaves its socket, and the connections
queued in it, to its replacement: none is reset. The load here opens a new
connection for every request, so connections are queued at every moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.server import (
    ROOT,
    SHIPPED_CONFIG,
    Server,
    free_port,
    server_env,
    wait_for,
    wait_until_serving,
)

pytestmark = pytest.mark.slow

APP = "quart_service.app:app"
DRAIN = 2.0
ENV = {"QUART_SERVICE_STREAM_DRAIN_TIMEOUT": str(DRAIN), "QUART_SERVICE_ACCESS_LOG": "0"}


async def _pids_of_new_connections(url: str, count: int, timeout: float = 10) -> Counter[int]:
    """``count`` requests at once, each on a connection of its own: which worker
    answered them."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        answers = await asyncio.gather(*(client.get("/livez") for _ in range(count)))
    return Counter(answer.json()["pid"] for answer in answers)


@dataclass
class _Churn:
    ok: int = 0
    pids: set[int] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def _churn(url: str, clients: int = 10) -> AsyncIterator[_Churn]:
    """Clients that open a new connection for every request, while the block runs."""
    report = _Churn()
    stop = asyncio.Event()

    async def client() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
            while not stop.is_set():
                try:
                    response = await http.get("/livez")
                    response.raise_for_status()
                    report.pids.add(response.json()["pid"])
                    report.ok += 1
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    report.failures.append(repr(exc))

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    try:
        yield report
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)


def _until(check: bool, deadline: float) -> bool:
    return check or time.monotonic() >= deadline


def _serving(log: str) -> set[int]:
    """The workers the supervisor saw serving."""
    return {int(pid) for pid in re.findall(r"worker (\d+) serving \(started", log)}


async def _first_event_pid(lines: AsyncIterator[str]) -> int:
    async for line in lines:
        if line.startswith("data: "):
            pid: int = json.loads(line[6:])["pid"]
            return pid
    raise AssertionError("the stream ended before its first event")


@contextlib.contextmanager
def _serve(
    tmp_path: Path,
    *args: str,
    drain: float = DRAIN,
    app: str = APP,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``quart-service serve`` with 2 workers on a free loopback port, plus ``args``."""
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    command = [
        sys.executable, "-m", "quart_service.server.cli", "serve", app,
        "--config", str(SHIPPED_CONFIG), "--bind", f"127.0.0.1:{port}",
        "--workers", "2", *args,
    ]  # fmt: skip
    env = server_env(
        {
            **ENV,
            "QUART_SERVICE_DATA_DIR": str(tmp_path / f"data-{port}"),
            "QUART_SERVICE_STREAM_DRAIN_TIMEOUT": str(drain),
            **(env or {}),
        }
    )
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = Server(process, port, log_path)
    try:
        wait_until_serving(server, 2, 30)
        yield server
    finally:
        server.stop()


async def test_new_connections_spread_over_the_workers(tmp_path: Path) -> None:
    # With one shared socket, the first burst after start was often even and the next
    # ones were 62/2, 60/4, 58/6, 56/8. The kernel's hash splits like coin tosses:
    # 48 of 64 (75 %) is 4 standard deviations from an even split.
    path = tmp_path / "serve.sock"
    with _serve(tmp_path, "--bind", f"unix:{path}") as server:
        assert "(a listening socket per worker)" in server.log()
        workers = set(server.worker_pids())
        for _ in range(4):
            counts = await _pids_of_new_connections(server.url, 64)
            assert set(counts) == workers
            assert max(counts.values()) <= 48, counts
        # A unix: bind stays one socket that every worker shares.
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            answer = await client.get("http://serve/livez")
        assert answer.json()["pid"] in workers


async def test_rolling_restart_under_new_connections_fails_none(tmp_path: Path) -> None:
    # Every request opens a connection, so some are always waiting to be accepted
    # when an old worker stops accepting: they are served, not reset.
    with _serve(tmp_path) as server:
        before = set(server.worker_pids())
        async with _churn(server.url) as report:
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while not _until(server.log().count("retired (exit code 0)") == 2, deadline):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        after = set(server.worker_pids())
        assert len(after) == 2, server.log()
        assert not after & before
        assert report.failures == [], report.failures[:5]
        assert report.pids & after, "the new workers served"
        assert report.ok > 100


async def test_a_worker_sigtermed_alone_is_replaced_before_its_drain_ends(
    tmp_path: Path,
) -> None:
    with _serve(tmp_path, drain=5.0) as server:
        before = set(server.worker_pids())
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
            client.stream("GET", "/demo/stream?count=100&interval=0.1") as stream,
            _churn(server.url) as report,
        ):
            # The stream keeps its worker draining until the drain timeout (while
            # `lines` lives: a dropped iterator closes the stream).
            lines = stream.aiter_lines()
            draining = await _first_event_pid(lines)
            os.kill(draining, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while not _until(bool(_serving(server.log()) - before), deadline):
                await asyncio.sleep(0.05)
            still_draining = draining in server.worker_pids()
            await asyncio.sleep(0.5)  # the churn goes on, on the replacement too
        assert _serving(server.log()) - before, server.log()
        assert still_draining, "the replacement served only after the old worker exited"
        assert f"worker {draining} stopped accepting on its own" in server.log()
        assert report.failures == [], report.failures[:5]
        assert report.pids - before, "the replacement served"


async def test_connections_waiting_for_a_killed_worker_are_served_by_its_replacement(
    tmp_path: Path,
) -> None:
    with _serve(tmp_path) as server:
        victim, survivor = server.worker_pids()
        os.kill(victim, signal.SIGSTOP)  # it accepts nothing: its connections wait
        try:
            async with asyncio.TaskGroup() as requests:
                answers = [
                    requests.create_task(_pids_of_new_connections(server.url, 1, timeout=30))
                    for _ in range(24)
                ]
                await asyncio.sleep(0.5)  # the connections are made
                os.kill(victim, signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        pids = Counter[int]()
        for answer in answers:
            pids.update(answer.result())  # none failed
        (replacement,) = set(server.worker_pids()) - {survivor}
        assert set(pids) == {survivor, replacement}, pids
        assert sum(pids.values()) == 24


async def test_while_a_replacement_fails_to_start_new_connections_go_to_the_others(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "broken"
    env = {"BREAK_MARKER": str(marker)}
    with _serve(tmp_path, app="tests.apps.breaks_on_restart:app", env=env) as server:
        victim, survivor = server.worker_pids()
        marker.touch()  # from now on, every worker fails at start-up
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "1 in a row, next try in 0.5 s" in server.log(), "a failed start")
        # Until the next try, nobody accepts on the victim's socket: the supervisor
        # has replaced it with one that does not listen, so the kernel sends every
        # new connection to the survivor instead of queueing half of them there.
        counts = await _pids_of_new_connections(server.url, 16, timeout=3)
        assert counts == {survivor: 16}
        assert "reopened it" in server.log()


async def test_shared_socket_flag_serves_as_before(tmp_path: Path) -> None:
    with _serve(tmp_path, "--shared-socket") as server:
        assert "(one shared listening socket)" in server.log()
        counts = await _pids_of_new_connections(server.url, 16)
        assert set(counts) <= set(server.worker_pids())


def test_a_port_shared_by_another_of_this_users_servers_is_refused(tmp_path: Path) -> None:
    # SO_REUSEPORT would let a second server started by mistake take half the traffic.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "quart_service.server.cli", "serve",
             "--bind", f"127.0.0.1:{port}", "--workers", "2"],
            cwd=ROOT,
            env=server_env({"QUART_SERVICE_DATA_DIR": str(tmp_path / "data")}),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
