"""The streaming helpers in process: wire format, errors, the sync bridge, backpressure."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextvars import copy_context
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestAppProtocol as RunningApp

from quart_service import NDJSON, SSE, ServerSentEvent, Settings, create_app, ndjson, sse
from quart_service.executor import BoundedExecutor
from quart_service.streaming import StreamHub, StreamPolicy
from quart_service.streaming.body import StreamBody


def test_sse_encoding_of_each_item_kind() -> None:
    assert SSE.encode("hello") == b"data: hello\n\n"
    assert SSE.encode("two\nlines") == b"data: two\ndata: lines\n\n"
    assert SSE.encode({"a": 1, "b": "é"}) == 'data: {"a":1,"b":"é"}\n\n'.encode()
    assert SSE.encode(b"raw bytes pass through") == b"raw bytes pass through"
    event = ServerSentEvent({"x": [1, 2]}, event="update", id="7", retry=3000)
    assert SSE.encode(event) == b'event: update\nid: 7\nretry: 3000\ndata: {"x":[1,2]}\n\n'
    with pytest.raises(ValueError, match="newline"):
        SSE.encode(ServerSentEvent("x", event="bad\nname"))
    assert SSE.error("boom", "it broke") == (
        b'event: error\ndata: {"error":{"code":"boom","message":"it broke"}}\n\n'
    )


def test_ndjson_encoding() -> None:
    assert NDJSON.encode({"a": 1}) == b'{"a":1}\n'
    assert NDJSON.encode([1, "x"]) == b'[1,"x"]\n'
    assert NDJSON.heartbeat is None
    assert NDJSON.error("c", "m") == b'{"error":{"code":"c","message":"m"}}\n'


@pytest.fixture
def app(settings: Settings) -> Quart:
    app = create_app(settings)

    @app.get("/fails")
    async def fails() -> Any:
        async def produce() -> AsyncIterator[str]:
            yield "one"
            raise RuntimeError("secret internal detail")

        return sse(produce())

    @app.get("/bridged")
    async def bridged() -> Any:
        def produce() -> Iterator[dict[str, Any]]:
            for n in range(3000):
                yield {"n": n, "thread": threading.current_thread().name}

        return ndjson(produce())

    @app.get("/bridged-fails")
    async def bridged_fails() -> Any:
        def produce() -> Iterator[str]:
            yield "one"
            raise ValueError("secret internal detail")

        return sse(produce())

    @app.get("/not-a-stream")
    async def not_a_stream() -> Any:
        return sse("a string is not a stream of events")

    return app


async def test_failing_producer_ends_with_an_error_event_and_no_traceback(
    test_app: RunningApp,
) -> None:
    client = test_app.test_client()
    for path in ("/fails", "/bridged-fails"):
        response = await client.get(path)
        body = await response.get_data(as_text=True)
        assert response.status_code == 200
        assert body.startswith("data: one\n\n")
        assert body.endswith(
            'event: error\ndata: {"error":{"code":"stream_failed",'
            '"message":"The stream\'s producer failed; the error was logged."}}\n\n'
        )
        assert "secret internal detail" not in body


async def test_sync_iterator_runs_on_the_pool_and_is_coalesced(
    test_app: RunningApp,
) -> None:
    client = test_app.test_client()
    response = await client.get("/bridged")
    lines = (await response.get_data(as_text=True)).splitlines()
    assert response.headers["content-type"] == "application/x-ndjson"
    assert len(lines) == 3000
    assert lines[0].startswith('{"n":0,')
    assert lines[-1].startswith('{"n":2999,')
    assert all('"thread":"quart-service-pool' in line for line in lines)
    identity = await (await client.get("/debug/identity")).get_json()
    streams = identity["streams"]
    assert streams["events"] == 3000
    # Items produced together left together: far fewer writes than items.
    assert streams["writes"] < 3000 / 10


async def test_a_string_is_refused_as_a_stream_source(test_app: RunningApp) -> None:
    response = await test_app.test_client().get("/not-a-stream")
    assert response.status_code == 500
    assert (await response.get_json())["error"]["code"] == "internal_error"


POLICY = StreamPolicy(idle_timeout=0, total_timeout=0, heartbeat=0, buffer_bytes=1000)


async def _produced_while_nobody_reads(source: Any, produced: list[int]) -> int:
    executor = BoundedExecutor(2, 2)
    try:
        body = StreamBody(source, SSE, StreamHub(POLICY), executor, copy_context())
        async with body:
            await asyncio.sleep(0.3)  # the client reads nothing meanwhile
            stalled_at = len(produced)
            chunk = await body.__anext__()  # one read takes all: room again
            assert chunk.startswith(b"data: 0 ")
            assert chunk.count(b"\n\n") == stalled_at
            await asyncio.sleep(0.3)
            assert len(produced) > stalled_at  # the producer resumed
        return stalled_at
    finally:
        executor.shutdown(wait=True)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_producer_waits_when_the_buffer_is_full(kind: str) -> None:
    produced: list[int] = []
    event = 100  # bytes per encoded event, about

    async def produce_async() -> AsyncIterator[str]:
        for n in range(1_000_000):
            produced.append(n)
            yield f"{n}".ljust(event - 8)

    def produce_sync() -> Iterator[str]:
        for n in range(1_000_000):
            produced.append(n)
            yield f"{n}".ljust(event - 8)

    source = produce_async() if kind == "async" else produce_sync()
    stalled_at = await _produced_while_nobody_reads(source, produced)
    # 1000 buffered bytes hold ~10 events: the producer stopped right there.
    assert 5 <= stalled_at <= 15
