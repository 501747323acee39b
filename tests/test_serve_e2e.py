"""``quart-service serve``: workers replaced, drained and reloaded, with real processes.

Each test starts the real supervisor with real Hypercorn workers on a free loopback
port, drives a bounded load against it, and signals processes by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support.load import steady_load
from tests.support.server import ROOT, free_port, running_server, server_env

pytestmark = pytest.mark.slow

APP = "quart_service.app:app"
DRAIN = 3.0
ENV = {"QUART_SERVICE_STREAM_DRAIN_TIMEOUT": str(DRAIN), "QUART_SERVICE_ACCESS_LOG": "0"}


async def _pid_of_new_connection(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        pid: int = (await client.get("/livez", headers={"Connection": "close"})).json()["pid"]
        return pid


async def _first_event_pid(lines: AsyncIterator[str]) -> int:
    async for line in lines:
        if line.startswith("data: "):
            pid: int = json.loads(line[6:])["pid"]
            return pid
    raise AssertionError("the stream ended before its first event")


async def test_a_killed_worker_is_replaced_within_2s_and_the_others_never_fail(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path, app=APP, workers=3, env=ENV, command="serve") as server:
        before = set(server.worker_pids())
        assert len(before) == 3
        async with (
            steady_load(server.url, json_clients=6, stream_clients=4) as report,
            httpx.AsyncClient(base_url=server.url, timeout=30) as doomed_client,
            doomed_client.stream("GET", "/demo/stream?count=400&interval=0.05") as doomed,
        ):
            await asyncio.sleep(1.0)
            # The victim is the worker serving this stream: it is cut, visibly.
            lines = doomed.aiter_lines()
            victim = await _first_event_pid(lines)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(httpx.HTTPError):
                async for _ in lines:
                    pass
            replacement = None
            while time.monotonic() - killed_at < 5:
                pid = await _pid_of_new_connection(server.url)
                if pid not in before:
                    replacement = pid
                    break
                await asyncio.sleep(0.02)
            replaced_in = time.monotonic() - killed_at
            await asyncio.sleep(1.0)  # the load goes on, now on the replacement too
        assert replacement is not None, server.log()
        assert replaced_in < 2.0, f"the replacement served after {replaced_in:.2f} s"
        survivors = before - {victim}
        # Requests on the killed worker may fail (they were cut); no other request does.
        assert report.failed_elsewhere({victim}) == [], report.failures
        assert report.ok_json > 100
        assert report.ok_streams > 10
        assert server.process.poll() is None  # the server never stopped
        assert set(server.worker_pids()) == survivors | {replacement}
        assert f"worker {victim} died (killed by SIGKILL)" in server.log()


async def test_sigterm_ends_each_open_stream_with_a_shutdown_event_and_exits_0(
    tmp_path: Path,
) -> None:
    streams = 50
    with running_server(tmp_path, app=APP, workers=2, env=ENV, command="serve") as server:
        endings: list[str] = []

        async def one_stream(client: httpx.AsyncClient) -> None:
            lines: list[str] = []
            async with client.stream("GET", "/demo/stream?count=1000&interval=0.2") as response:
                async for line in response.aiter_lines():
                    lines.append(line)
            endings.append("\n".join(lines[-4:]))

        limits = httpx.Limits(max_connections=streams)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            tasks = [asyncio.create_task(one_stream(client)) for _ in range(streams)]
            await asyncio.sleep(1.5)  # every stream is open and sending
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.to_thread(server.process.wait, DRAIN + 10)
            exited_in = time.monotonic() - signalled
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert code == 0, server.log()
    assert exited_in < DRAIN + 2, f"exited {exited_in:.2f} s after SIGTERM"
    assert exited_in >= DRAIN - 0.5  # the streams really were given the drain time
    assert len(endings) == streams
    for ending in endings:
        assert "event: error\nretry: 1000\n" in ending, ending
        payload = json.loads(ending.split("data: ", 1)[1])
        assert payload["error"]["code"] == "shutdown"


async def test_sighup_replaces_every_worker_with_zero_failed_requests(tmp_path: Path) -> None:
    with running_server(tmp_path, app=APP, workers=3, env=ENV, command="serve") as server:
        before = set(server.worker_pids())
        async with steady_load(server.url, json_clients=8, stream_clients=4) as report:
            await asyncio.sleep(1.0)
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = set(server.worker_pids())
                if len(now) == 3 and not now & before:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
        after = set(server.worker_pids())
        assert len(after) == 3, server.log()
        assert not after & before
        assert report.failures == [], report.failures
        assert report.pids & after, "the new workers served the load"
        assert report.ok_json > 100
        assert report.ok_streams > 10
        assert server.log().count("retired (exit code 0)") == 3


def test_workers_failing_at_start_up_are_retried_with_backoff_then_given_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable, "-m", "quart_service.server.cli", "serve",
            "tests.apps.fails_at_startup:app",
            "--config", str(ROOT / "hypercorn.toml"),
            "--bind", f"127.0.0.1:{port}", "--workers", "2", "--max-start-failures", "3",
        ],
        cwd=ROOT,
        env=server_env({"QUART_SERVICE_DATA_DIR": str(tmp_path / "data")}),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 1
    assert "giving up: 3 workers in a row exited before serving" in result.stderr
    assert "next try in 0.5 s" in result.stderr
    assert "next try in 1.0 s" in result.stderr
    # Backoff, not a tight loop: 0.5 s and 1 s waits between the three attempts.
    assert took >= 1.5
    assert result.stderr.count("exited before serving") <= 3


def test_serve_refuses_bad_settings_before_starting_any_worker(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quart_service.server.cli", "serve", "--bind", "127.0.0.1:1"],
        cwd=ROOT,
        env=server_env({"QUART_SERVICE_EXECUTOR_THREADS": "many"}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "QUART_SERVICE_EXECUTOR_THREADS" in result.stderr
    assert "Running on" not in result.stderr


def test_serve_says_why_it_cannot_start_when_the_port_is_taken_or_the_file_is_bad(
    tmp_path: Path,
) -> None:
    env = server_env({"QUART_SERVICE_DATA_DIR": str(tmp_path / "data")})
    serve = [sys.executable, "-m", "quart_service.server.cli", "serve"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*serve, "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "hypercorn.toml"
    bad.write_text("workers = [\n")
    result = subprocess.run(
        [*serve, "--config", str(bad)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"bad server config {bad}" in result.stderr
