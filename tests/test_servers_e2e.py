"""The same app under Granian and Uvicorn, with real worker processes (docs/servers.md):
streams arrive whole, each worker builds its own singletons, threads stay bounded,
and SIGTERM drains open streams with the ``shutdown`` event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .support.other_servers import (
    OTHER_SERVERS,
    Kind,
    OtherServer,
    running_other_server,
    server_command,
)
from .support.server import ROOT, free_port, peak_threads, pinned_workers, server_env, wait_for

APP = "quart_service.app:app"

POOL = 4
DATABASE_CONNECTIONS = 1  # the refresh leader's aiosqlite connection runs one thread
# The worker's own threads beside the pool and the database's, as measured: the main
# thread, plus Granian's Rust runtime (a tokio worker, the thread that calls into
# Python, the signal watcher) or Uvicorn's health-check answerer. Hypercorn: 2.
SERVER_THREADS = {"granian": 4, "uvicorn": 2}
DRAIN = 2.0
ENV = {
    "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
    "QUART_SERVICE_EXECUTOR_THREADS": str(POOL),
    "QUART_SERVICE_STREAM_DRAIN_TIMEOUT": str(DRAIN),
    "QUART_SERVICE_ACCESS_LOG": "0",
}
# Each server's graceful limit above the drain (docs/servers.md), so the drain decides.
GRACEFUL = {
    "granian": ["--workers-kill-timeout", str(int(DRAIN) + 5)],
    "uvicorn": ["--timeout-graceful-shutdown", str(int(DRAIN) + 5)],
}
CHAT: dict[str, Any] = {
    "model": "local-ngram",
    "messages": [{"role": "user", "content": "that government of the people"}],
    "max_tokens": 60,
    "seed": 7,
}


@pytest.fixture(scope="module", params=OTHER_SERVERS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OtherServer]:
    """One server of each kind, shared by the tests that leave it running."""
    kind: Kind = request.param
    tmp_path = tmp_path_factory.mktemp(kind)
    with running_other_server(kind, tmp_path, env=ENV, extra=GRACEFUL[kind]) as server:
        yield server


def _sse_data(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_a_chat_completion_stream_arrives_whole(served: OtherServer) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        whole = client.post("/v1/chat/completions", json=CHAT).json()
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        long = client.get("/demo/stream", params={"count": 200, "interval": 0.005})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = _sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    events = [json.loads(d) for d in _sse_data(long.text)]
    assert [e["n"] for e in events] == list(range(200))


async def _mixed_load(url: str, rounds: int) -> list[int]:
    """Chat completions (the engine on the pool), bridged sync streams, JSON."""
    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(i: int) -> int:
            if i % 3 == 0:
                response = await client.post("/v1/chat/completions", json={**CHAT, "seed": i})
            elif i % 3 == 1:
                params = "count=20&interval=0.002&source=sync"
                response = await client.get("/demo/stream?" + params)
                assert response.text.count("data: ") == 20
            else:
                response = await client.get("/livez")
            return response.status_code

        statuses = []
        for _ in range(rounds):
            statuses += await asyncio.gather(*(one(i) for i in range(60)))
        return statuses


def test_each_worker_builds_its_own_singletons_and_its_threads_stay_bounded(
    served: OtherServer,
) -> None:
    pids = served.worker_pids()
    assert len(pids) == 2
    with peak_threads(pids) as peak:
        statuses = asyncio.run(_mixed_load(served.url, rounds=3))
    assert statuses == [200] * len(statuses)
    with pinned_workers(served, 2) as clients:
        assert sorted(clients) == pids
        identities = {pid: client.get("/debug/identity").json() for pid, client in clients.items()}
    instances = []
    for pid, identity in identities.items():
        assert identity["pid"] == pid
        assert identity["ppid"] == served.process.pid
        resources = {r["name"]: r for r in identity["resources"]}
        # The lifespan ran in this worker: its parts started, its snapshot loaded.
        assert identity["worker"]["started_at"] is not None
        assert resources["snapshot"]["state"] == "ready"
        # Built once in this worker, however many requests used it.
        assert resources["engines"]["state"] == "ready", resources["engines"]
        assert resources["engines"]["builds"] == 1
        instances += [resources["snapshot"]["instance_id"], resources["engines"]["instance_id"]]
    assert len(set(instances)) == 4, "each worker has its own instances"
    # Exactly one refresh leader among the workers.
    assert sorted(i["data"]["role"] for i in identities.values()) == ["follower", "leader"]
    bound = POOL + DATABASE_CONNECTIONS + SERVER_THREADS[served.kind]
    print(f"{served.kind}: peak threads per worker {peak} (bound {bound})")
    assert all(0 < n <= bound for n in peak.values()), peak


def _new_worker_serving(server: OtherServer, gone: set[int]) -> int | None:
    with contextlib.suppress(httpx.HTTPError):
        response = httpx.get(server.url + "/livez", headers={"Connection": "close"}, timeout=2)
        pid: int = response.json()["pid"]
        if pid not in gone:
            return pid
    return None


async def _stream_until_cut(client: httpx.AsyncClient, endings: list[str], pids: set[int]) -> None:
    """A long SSE stream; record its worker and its last lines once it ends."""
    lines: list[str] = []
    async with client.stream("GET", "/demo/stream?count=1000&interval=0.1") as response:
        async for line in response.aiter_lines():
            lines.append(line)
    pids.add(json.loads(_sse_data("\n".join(lines))[0])["pid"])
    endings.append("\n".join(lines[-4:]))


@pytest.mark.parametrize("kind", OTHER_SERVERS)
async def test_serve_hands_over_a_killed_worker_is_replaced_and_sigterm_drains_streams(
    kind: Kind, tmp_path: Path
) -> None:
    """``quart-service serve --server KIND`` becomes the server (the command of
    docs/servers.md); SIGTERM to it (the parent) ends every open stream with the
    ``shutdown`` event at the drain deadline, and every process exits."""
    with running_other_server(kind, tmp_path, env=ENV, via_serve=True) as server:
        command = psutil.Process(server.process.pid).cmdline()
        assert command[1:3] == ["-m", kind], command
        assert " ".join(GRACEFUL[kind]) in " ".join(command), command
        # Crash replacement: Granian's --respawn-failed-workers, Uvicorn's own.
        before = set(server.worker_pids())
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        replacement = await asyncio.to_thread(
            wait_for, lambda: _new_worker_serving(server, before), "a new worker serves"
        )
        replaced_in = time.monotonic() - killed
        assert server.process.poll() is None, server.log()
        workers = server.worker_pids()
        assert set(workers) == before - {victim} | {replacement}
        # The drain.
        endings: list[str] = []
        pids: set[int] = set()
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            tasks = [
                asyncio.create_task(_stream_until_cut(client, endings, pids)) for _ in range(8)
            ]
            await asyncio.sleep(1.0)  # every stream is open and sending
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.to_thread(server.process.wait, DRAIN + 10)
            exited_in = time.monotonic() - signalled
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    log = server.log()
    assert code == 0, log
    assert not [pid for pid in workers if psutil.pid_exists(pid)], "the workers exited"
    assert DRAIN - 0.5 <= exited_in < DRAIN + 2, f"exited {exited_in:.2f} s after SIGTERM"
    assert len(endings) == 8
    for ending in endings:
        assert "event: error\nretry: 1000\n" in ending, ending
        payload = json.loads(ending.split("data: ", 1)[1])
        assert payload["error"]["code"] == "shutdown"
    # Each worker ran its shutdown hook (after_serving): the killed one could not.
    assert len(re.findall(r"worker \d+ stopping", log)) == 2, log
    print(
        f"{kind}: a killed worker served again after {replaced_in:.2f} s; streams on "
        f"workers {sorted(pids)} got the shutdown event; exit {exited_in:.2f} s after SIGTERM"
    )


@pytest.mark.parametrize("kind", OTHER_SERVERS)
def test_serve_refuses_bad_settings_before_starting_the_server(kind: Kind) -> None:
    result = subprocess.run(
        server_command(kind, APP, port=free_port(), workers=2, via_serve=True),
        cwd=ROOT,
        env=server_env({"QUART_SERVICE_EXECUTOR_THREADS": "many"}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "QUART_SERVICE_EXECUTOR_THREADS" in result.stderr
    assert "exec" not in result.stderr
