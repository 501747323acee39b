"""The streaming helpers in process: wire format, errors, the sync bridge, backpressure."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextvars import copy_context
from typing import Any

import pytest
from quart import Quart, request
from quart.typing import TestAppProtocol as RunningApp

from quart_service import NDJSON, SSE, ServerSentEvent, Settings, create_app, ndjson, sse
from quart_service.executor import BoundedExecutor
from quart_service.observability.observer import _Exchange
from quart_service.streaming import StreamHub, StreamPolicy
from quart_service.streaming.body import StreamBody


def test_sse_encoding_of_each_item_kind() -> None:
    assert SSE.encode("hello") == b"data: hello\n\n"
    assert SSE.encode("two\nlines") == b"data: two\ndata: lines\n\n"
    assert SSE.encode({"a": 1, "b": "é"}) == 'data: {"a":1,"b":"é"}\n\n'.encode()
    # What orjson refuses (an int beyond 64 bits) the standard library's encoder takes.
    assert SSE.encode({"big": 2**70, 1: "x"}) == b'data: {"big":1180591620717411303424,"1":"x"}\n\n'
    assert SSE.encode([2**70]) == b"data: [1180591620717411303424]\n\n"
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

    @app.get("/echo")
    async def echo() -> Any:
        async def produce() -> AsyncIterator[str]:
            for word in request.args["words"].split():
                await asyncio.sleep(0)
                yield f"{word} {request.path}"  # the view's request, inside the producer

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


async def test_the_producer_sees_the_views_request(test_app: RunningApp) -> None:
    response = await test_app.test_client().get("/echo?words=a+b")
    assert await response.get_data(as_text=True) == "data: a /echo\n\ndata: b /echo\n\n"


async def test_a_string_is_refused_as_a_stream_source(test_app: RunningApp) -> None:
    response = await test_app.test_client().get("/not-a-stream")
    assert response.status_code == 500
    assert (await response.get_json())["error"]["code"] == "internal_error"


POLICY = StreamPolicy(idle_timeout=0, total_timeout=0, heartbeat=0, buffer_bytes=1000)


async def test_a_sync_producer_waits_when_the_buffer_is_full() -> None:
    produced: list[int] = []
    event = 100  # bytes per encoded event, about

    def produce() -> Iterator[str]:
        for n in range(1_000_000):
            produced.append(n)
            yield f"{n}".ljust(event - 8)

    executor = BoundedExecutor(2, 2)
    try:
        body = StreamBody(produce(), SSE, StreamHub(POLICY), executor, copy_context())
        async with body:
            await asyncio.sleep(0.3)  # the client reads nothing meanwhile
            stalled_at = len(produced)
            chunk = await body.__anext__()  # one read takes all: room again
            assert chunk.startswith(b"data: 0 ")
            assert chunk.count(b"\n\n") == stalled_at
            await asyncio.sleep(0.3)
            assert len(produced) > stalled_at  # the producer resumed
    finally:
        executor.shutdown(wait=True)
    # 1000 buffered bytes hold ~10 events: the producer stopped right there.
    assert 5 <= stalled_at <= 15


async def test_an_async_producer_runs_only_as_fast_as_the_client_reads() -> None:
    produced: list[int] = []

    async def produce() -> AsyncIterator[str]:
        for n in range(1_000_000):
            produced.append(n)
            yield f"{n}".ljust(92)

    body = StreamBody(produce(), SSE, StreamHub(POLICY), BoundedExecutor(1, 1), copy_context())
    async with body:
        await asyncio.sleep(0.1)
        assert produced == []  # pulled by the response, not pushed ahead of it
        chunk = await body.__anext__()
        # Every ready item leaves in one write, up to the buffer (~10 events).
        assert chunk.startswith(b"data: 0 ")
        assert 5 <= chunk.count(b"\n\n") <= 15
        assert len(produced) == chunk.count(b"\n\n")
        await asyncio.sleep(0.1)
        assert len(produced) == chunk.count(b"\n\n")


async def test_paced_items_leave_one_per_write_and_queued_ones_together() -> None:
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def produce() -> AsyncIterator[str]:
        while (item := await queue.get()) is not None:
            yield item

    hub = StreamHub(POLICY)
    body = StreamBody(produce(), SSE, hub, BoundedExecutor(1, 1), copy_context())
    async with body:
        queue.put_nowait("a")
        assert await body.__anext__() == b"data: a\n\n"  # not held back for more
        later = asyncio.get_running_loop().call_later(0.05, queue.put_nowait, "b")
        assert await body.__anext__() == b"data: b\n\n"  # waited for, then sent at once
        later.cancel()
        for item in ("c", "d", "e"):  # queued while the last write was in flight
            queue.put_nowait(item)
        assert await body.__anext__() == b"data: c\n\ndata: d\n\ndata: e\n\n"
        queue.put_nowait(None)
        with pytest.raises(StopAsyncIteration):
            await body.__anext__()
    assert hub.counts.events.value == 5
    assert hub.counts.writes.value == 3


async def test_a_token_that_was_waited_for_is_sent_before_the_generator_goes_on() -> None:
    # A model's generator may work between a token and its next wait (sampling, say):
    # the token it waited for is written first, not held behind that work.
    order: list[str] = []

    async def produce() -> AsyncIterator[str]:
        for token in ("a", "b"):
            await asyncio.sleep(0)  # the token is waited for
            yield token
            order.append(f"went on after {token}")

    async def send(message: Any) -> None:
        if message["body"]:
            order.append(f"sent {message['body'].decode().strip()}")

    policy = StreamPolicy(idle_timeout=0, total_timeout=0, heartbeat=0, buffer_bytes=1000)
    body = StreamBody(produce(), SSE, StreamHub(policy), BoundedExecutor(1, 1), copy_context())
    async with body:
        await asyncio.wait_for(body.send_to(send), 5)
    assert order == ["sent data: a", "went on after a", "sent data: b", "went on after b"]


class _OwnIterator:
    """What Granian's send returns: an awaitable that is its own iterator both ways,
    which may take one loop turn before it is done."""

    def __init__(self, turns: int) -> None:
        self._turns = turns

    def __await__(self) -> _OwnIterator:
        return self

    def __iter__(self) -> _OwnIterator:
        return self

    def __next__(self) -> None:
        if self._turns:
            self._turns -= 1
            return  # a bare yield: the task runs again on the next loop turn
        raise StopIteration


@pytest.mark.parametrize("returns", ["coroutine", "own-iterator", "future"])
async def test_every_byte_sent_is_counted_whatever_the_servers_send_returns(
    returns: str,
) -> None:
    loop = asyncio.get_running_loop()
    written: list[bytes] = []

    async def write(message: Any) -> None:
        written.append(message.get("body", b""))

    def server_send(message: Any) -> Any:
        if returns == "coroutine":
            return write(message)
        written.append(message.get("body", b""))
        if returns == "own-iterator":
            return _OwnIterator(turns=len(written) % 2)
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        return future

    async def produce() -> AsyncIterator[dict[str, int]]:
        for n in range(20):
            yield {"n": n}
            await asyncio.sleep(0)

    exchange = _Exchange(server_send, (b"x-request-id", b"1"), lambda: False)
    await exchange({"type": "http.response.start", "status": 200, "headers": []})
    body = StreamBody(produce(), SSE, StreamHub(POLICY), BoundedExecutor(1, 1), copy_context())
    async with body:
        await asyncio.wait_for(body.send_to(exchange), 5)
    chunks = written[1:]  # after the head
    assert b"".join(chunks) == b"".join(SSE.encode({"n": n}) for n in range(20))
    assert exchange.sent == sum(len(chunk) for chunk in chunks)


@pytest.mark.parametrize("waited", [True, False], ids=["waited-for", "ready"])
async def test_an_item_that_cannot_be_encoded_ends_the_stream_with_an_error_event(
    waited: bool,
) -> None:
    closed: list[str] = []
    written: list[bytes] = []

    async def produce() -> AsyncIterator[object]:
        try:
            yield "one"
            if waited:
                await asyncio.sleep(0)
            yield object()  # neither JSON nor text
            yield "never"
        finally:
            closed.append("closed")

    async def send(message: Any) -> None:
        written.append(message["body"])

    policy = StreamPolicy(idle_timeout=0, total_timeout=0, heartbeat=0, buffer_bytes=1000)
    body = StreamBody(produce(), SSE, StreamHub(policy), BoundedExecutor(1, 1), copy_context())
    async with body:
        await asyncio.wait_for(body.send_to(send), 5)
    whole = b"".join(written)
    assert whole.startswith(b"data: one\n\n")
    assert whole.endswith(b"}}\n\n")
    assert b'event: error\ndata: {"error":{"code":"stream_failed"' in whole
    assert b"never" not in whole
    assert closed == ["closed"]


async def test_heartbeats_are_written_beside_a_waiting_producer() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    closed: list[str] = []
    written: list[bytes] = []

    async def produce() -> AsyncIterator[str]:
        try:
            yield await gate
        finally:
            closed.append("finally")

    async def send(message: Any) -> None:
        written.append(message["body"])

    policy = StreamPolicy(idle_timeout=0, total_timeout=0, heartbeat=0.05, buffer_bytes=1000)
    hub = StreamHub(policy)
    body = StreamBody(produce(), SSE, hub, BoundedExecutor(1, 1), copy_context())
    async with body:
        sending = asyncio.ensure_future(body.send_to(send))
        await asyncio.sleep(0.3)
        assert not sending.done()  # the producer still waits, undisturbed
        assert 3 <= len(written) <= 7
        assert set(written) == {SSE.heartbeat}
        gate.set_result("token")  # the same await goes on and delivers
        await sending
    *heartbeats, last = written
    assert last == b"data: token\n\n"
    assert closed == ["finally"]
    assert hub.counts.heartbeats.value == len(heartbeats)


async def test_a_heartbeat_toward_a_full_socket_is_one_write_and_goes_first() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    room = asyncio.Event()  # the client's socket has room again
    calls: list[bytes] = []
    written: list[bytes] = []

    async def produce() -> AsyncIterator[str]:
        yield await gate

    async def send(message: Any) -> None:
        calls.append(message["body"])
        await room.wait()  # the server's send waits while the socket is full
        written.append(message["body"])

    policy = StreamPolicy(idle_timeout=0, total_timeout=0, heartbeat=0.05, buffer_bytes=1000)
    hub = StreamHub(policy)
    body = StreamBody(produce(), SSE, hub, BoundedExecutor(1, 1), copy_context())
    async with body:
        sending = asyncio.ensure_future(body.send_to(send))
        await asyncio.sleep(0.3)
        assert calls == [SSE.heartbeat]  # one heartbeat waits; no second one piles up
        gate.set_result("token")
        await asyncio.sleep(0.05)
        assert calls == [SSE.heartbeat]  # the event waits for the heartbeat's write
        room.set()
        await sending
        assert written == [SSE.heartbeat, b"data: token\n\n"]


async def test_an_idle_timeout_cancels_the_awaiting_producer() -> None:
    closed: list[str] = []

    async def produce() -> AsyncIterator[str]:
        try:
            yield "first"
            await asyncio.sleep(30)
            yield "never"
        except asyncio.CancelledError:
            closed.append("cancelled")
            raise

    policy = StreamPolicy(idle_timeout=0.1, total_timeout=0, heartbeat=0, buffer_bytes=1000)
    body = StreamBody(produce(), SSE, StreamHub(policy), BoundedExecutor(1, 1), copy_context())
    async with body:
        assert await body.__anext__() == b"data: first\n\n"
        frame = await body.__anext__()  # in this task: the timeout cancels its wait
        assert b'"code":"stream_idle_timeout"' in frame
        with pytest.raises(StopAsyncIteration):
            await body.__anext__()
    assert closed == ["cancelled"]
