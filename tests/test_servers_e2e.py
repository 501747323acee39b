"""The same app under Granian and Uvicorn, with real worker processes (docs/servers.md):
streams arrive whole, each worker builds its own singletons, threads stay bounded,
and SIGTERM drains open streams with the ``shutdown`` event."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .support.other_servers import OTHER_SERVERS, Kind, OtherServer, running_other_server
from .support.server import peak_threads, pinned_workers

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
                params = {"count": 20, "interval": 0.002, "source": "sync"}
                response = await client.get("/demo/stream", params=params)
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


@pytest.mark.parametrize("kind", OTHER_SERVERS)
async def test_sigterm_ends_each_open_stream_with_a_shutdown_event_and_exits_0(
    kind: Kind, tmp_path: Path
) -> None:
    streams = 8
    with running_other_server(kind, tmp_path, env=ENV, extra=GRACEFUL[kind]) as server:
        endings: list[str] = []
        pids: set[int] = set()

        async def one_stream(client: httpx.AsyncClient) -> None:
            lines: list[str] = []
            async with client.stream("GET", "/demo/stream?count=1000&interval=0.1") as response:
                async for line in response.aiter_lines():
                    lines.append(line)
            pids.add(json.loads(_sse_data("\n".join(lines))[0])["pid"])
            endings.append("\n".join(lines[-4:]))

        limits = httpx.Limits(max_connections=streams)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            tasks = [asyncio.create_task(one_stream(client)) for _ in range(streams)]
            await asyncio.sleep(1.0)  # every stream is open and sending
            workers = server.worker_pids()
            # The parent: each server hands SIGTERM on to its workers.
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.to_thread(server.process.wait, DRAIN + 10)
            exited_in = time.monotonic() - signalled
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    log = server.log()
    assert not [pid for pid in workers if psutil.pid_exists(pid)], "the workers exited"
    assert code == 0, log
    assert DRAIN - 0.5 <= exited_in < DRAIN + 2, f"exited {exited_in:.2f} s after SIGTERM"
    assert len(endings) == streams
    for ending in endings:
        assert "event: error\nretry: 1000\n" in ending, ending
        payload = json.loads(ending.split("data: ", 1)[1])
        assert payload["error"]["code"] == "shutdown"
    # Every worker ran its own shutdown hook (after_serving), not only the streamed ones.
    assert len(re.findall(r"worker \d+ stopping", log)) == 2, log
    print(f"{kind}: streams on workers {sorted(pids)}, exited {exited_in:.2f} s after SIGTERM")
