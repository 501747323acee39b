"""Streams through a real Hypercorn with worker processes: timeouts, heartbeats,
disconnects and slow clients (docs/design.md, pitfalls 1 and 4)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quart_service.observability.proc import rss_bytes

from .conftest import read_events
from .support.server import Server, running_server


def sse_events(text: str) -> list[str]:
    """The data fields of an SSE body, one per event (comments dropped)."""
    events = []
    for block in text.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append("\n".join(data))
    return events


@pytest.mark.slow
def test_stream_longer_than_response_timeout_arrives_complete(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_RESPONSE_TIMEOUT": "1"}
    with running_server(tmp_path, workers=2, env=env) as server:
        started = time.monotonic()
        response = httpx.get(
            server.url + "/demo/stream", params={"count": 11, "interval": 0.25}, timeout=30
        )
        elapsed = time.monotonic() - started
        # Quart would cut a body at RESPONSE_TIMEOUT (1 s); this one takes ~2.75 s.
        assert elapsed >= 2.5
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = sse_events(response.text)
        assert len(events) == 11
        assert '"n":10' in events[-1]
        # The control: a plain Quart stream (11 events, 0.5 s apart) under the same
        # setting is cut at 1 s, and the connection is dropped without the end of the
        # chunked body.
        received: list[str] = []
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("GET", server.url + "/raw-stream", timeout=30) as raw,
        ):
            received.extend(line for line in raw.iter_lines() if line.startswith("data: "))
        assert 2 <= len(received) <= 6


def test_quiet_producer_ends_with_idle_timeout_event(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_STREAM_IDLE_TIMEOUT": "1", "QUART_SERVICE_STREAM_HEARTBEAT": "0"}
    with running_server(tmp_path, workers=2, env=env) as server:
        started = time.monotonic()
        response = httpx.get(server.url + "/quiet-stream", params={"quiet": 10}, timeout=30)
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed < 5
    assert "event: error" in response.text
    events = sse_events(response.text)
    assert events[0] == "first"
    assert '"code":"stream_idle_timeout"' in events[-1]
    assert "second" not in response.text


def test_total_limit_ends_a_busy_stream_with_an_error_event(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_STREAM_TOTAL_TIMEOUT": "1.5"}
    with running_server(tmp_path, workers=2, env=env) as server:
        response = httpx.get(
            server.url + "/demo/stream", params={"count": 100, "interval": 0.1}, timeout=30
        )
    events = sse_events(response.text)
    assert 5 <= len(events) < 100
    assert '"code":"stream_total_timeout"' in events[-1]


@pytest.mark.slow
def test_heartbeats_arrive_while_the_producer_is_quiet(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_STREAM_HEARTBEAT": "0.3"}
    with running_server(tmp_path, workers=2, env=env) as server:
        response = httpx.get(server.url + "/quiet-stream", params={"quiet": 2}, timeout=30)
    assert response.status_code == 200
    assert sse_events(response.text) == ["first", "second"]
    # ~2 s of silence at one comment per 0.3 s.
    heartbeats = response.text.count(": keep-alive\n\n")
    assert 4 <= heartbeats <= 8, response.text


def _identity(server: Server, pid: int) -> dict[str, object]:
    """The identity of worker ``pid`` (new connections until that worker answers)."""
    for _ in range(200):
        body: dict[str, object] = httpx.get(server.url + "/debug/identity", timeout=5).json()
        if body["pid"] == pid:
            return body
    raise AssertionError(f"worker {pid} never answered")


def _streams(identity: dict[str, object]) -> dict[str, int]:
    streams = identity["streams"]
    assert isinstance(streams, dict)
    return streams


def _wait_for(path: Path, kind: str, tag: str, timeout: float) -> dict[str, object] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in read_events(path):
            if event["kind"] == kind and event.get("tag") == tag:
                return event
        time.sleep(0.02)
    return None


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server whose test routes record events to a file, and that file: shared by
    the disconnect cases (each waits for its own kind of event)."""
    tmp_path = tmp_path_factory.mktemp("recording")
    events_file = tmp_path / "events.jsonl"
    env = {"TEST_EVENTS_FILE": str(events_file), "QUART_SERVICE_IDENTITY_ENDPOINT": "1"}
    with running_server(tmp_path, workers=2, env=env) as server:
        yield server, events_file


@pytest.mark.parametrize(
    ("route", "kind"),
    [("/async-stream", "async_finally"), ("/sync-stream", "sync_closed")],
)
def test_disconnect_stops_the_producer_within_a_second(
    recording: tuple[Server, Path], route: str, kind: str
) -> None:
    server, events_file = recording
    # The server is shared: count this case's disconnect from what each worker had.
    disconnected = {
        pid: _streams(_identity(server, pid))["disconnected"] for pid in server.worker_pids()
    }
    params: dict[str, str | int | float] = {"count": 1_000_000, "delay": 0.01, "tag": "gone"}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", server.url + route, params=params) as response,
    ):
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"n":0' in first
        # Read from the right worker afterwards: ask its identity first.
    left_at = time.time()
    event = _wait_for(events_file, kind, "gone", timeout=3)
    assert event is not None, "the producer kept running after the client left"
    assert float(event["t"]) - left_at < 1.0  # type: ignore[arg-type]
    pid = int(event["pid"])  # type: ignore[call-overload]
    identity = _identity(server, pid)
    streams = _streams(identity)
    executor = identity["executor"]
    assert isinstance(executor, dict)
    assert streams["disconnected"] >= disconnected[pid] + 1
    assert streams["active"] == 0
    assert executor["active"] == 0
    if kind == "sync_closed":
        assert str(event["thread"]).startswith("quart-service-pool")


def test_a_client_that_leaves_a_plain_view_cancels_it_without_an_error(
    recording: tuple[Server, Path],
) -> None:
    """The view runs in the server's own task; the request's one other task reads
    the body and, when the client leaves, cancels the view where it waits."""
    server, events_file = recording
    logged = len(server.log())
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.url + "/wait", params={"seconds": 30, "tag": "plain"}, timeout=0.5)
    left_at = time.time()
    event = _wait_for(events_file, "view_cancelled", "plain", timeout=3)
    assert event is not None, "the view kept waiting after the client left"
    assert float(event["t"]) - left_at < 1.0  # type: ignore[arg-type]
    # The request ended quietly (as under Quart's own connection), and every worker
    # still answers a view that does finish.
    for _ in range(4):
        answer = httpx.get(server.url + "/wait", params={"seconds": 0.01, "tag": "ok"})
        assert answer.json()["tag"] == "ok"
    since = server.log()[logged:]
    assert "Error in ASGI Framework" not in since
    assert "Traceback" not in since


@pytest.mark.slow
def test_slow_client_keeps_worker_memory_bounded(tmp_path: Path) -> None:
    """A client that stops reading while the producer could go on forever."""
    with running_server(tmp_path, workers=1) as server:
        (worker,) = server.worker_pids()
        before = rss_bytes(worker)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            # Shrink our receive buffer so the server's socket fills quickly.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /async-stream?delay=0&size=65536 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
            samples = []
            for _ in range(20):  # 4 s unread; unbounded buffering would grow GBs
                time.sleep(0.2)
                samples.append(rss_bytes(worker))
        growth = max(samples) - before
        print(f"RSS growth {growth / 1e6:.1f} MB")
        assert growth < 64 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB"
        # The worker is still healthy afterwards.
        assert httpx.get(server.url + "/livez", timeout=5).status_code == 200


@pytest.mark.slow
def test_sigterm_lets_an_open_stream_finish(tmp_path: Path) -> None:
    """The shipped graceful_timeout drains streams; Hypercorn's 3 s default cuts them."""
    with running_server(tmp_path, workers=2) as server, httpx.Client(timeout=30) as client:
        params = {"count": 9, "interval": 0.5}
        with client.stream("GET", server.url + "/demo/stream", params=params) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert len(rest) == 8
        assert '"n":8' in rest[-1]
        assert server.process.wait(timeout=10) == 0


@pytest.mark.slow
def test_sigterm_to_one_worker_drains_it_and_the_server_carries_on(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_STREAM_DRAIN_TIMEOUT": "10"}
    with running_server(tmp_path, workers=2, env=env) as server, httpx.Client(timeout=30) as client:
        params = {"count": 6, "interval": 0.5}
        with client.stream("GET", server.url + "/demo/stream", params=params) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            pid = json.loads(first[6:])["pid"]
            os.kill(pid, signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert len(rest) == 5
        # The drained worker exits on its own (code 0), so Hypercorn replaces it
        # instead of stopping the server.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pid in server.worker_pids():
            time.sleep(0.1)
        assert pid not in server.worker_pids()
        assert server.process.poll() is None
        while time.monotonic() < deadline and len(server.worker_pids()) < 2:
            time.sleep(0.1)
        assert len(server.worker_pids()) == 2
        assert client.get(server.url + "/livez").status_code == 200
