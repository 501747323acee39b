"""The lean request body: Quart's ``Body`` behaviour, without its per-request Events,
and the one shared null session; through the app where a view reads them."""

from __future__ import annotations

import asyncio

import pytest
from quart import request, session
from werkzeug.exceptions import RequestEntityTooLarge

from quart_service import Settings, create_app
from quart_service.request_body import Flag, LeanBody


async def test_a_body_read_in_parts_gets_each_part_as_it_arrives() -> None:
    body = LeanBody(None, None)
    parts: list[bytes] = []

    async def read() -> None:
        async for part in body:
            parts.append(part)

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0)
    body.append(b"one")
    await asyncio.sleep(0.01)
    assert parts == [b"one"]  # delivered before the body is complete
    body.append(b"two")
    body.set_complete()
    await asyncio.wait_for(reading, 1)
    assert parts == [b"one", b"two"]


async def test_a_body_awaited_whole_waits_for_its_end() -> None:
    body = LeanBody(None, None)
    whole = asyncio.ensure_future(_awaited(body))
    body.append(b"ab")
    await asyncio.sleep(0.01)
    assert not whole.done()
    body.append(b"cd")
    body.set_complete()
    assert await asyncio.wait_for(whole, 1) == b"abcd"


async def _awaited(body: LeanBody) -> bytes:
    data: bytes = await body
    return data


async def test_a_body_over_the_limit_raises_too_large_where_it_is_read() -> None:
    declared = LeanBody(10, 5)  # Content-Length says 10, the limit is 5
    with pytest.raises(RequestEntityTooLarge):
        await declared
    arriving = LeanBody(None, 5)
    waiting = asyncio.ensure_future(_awaited(arriving))
    await asyncio.sleep(0)
    arriving.append(b"123456")  # past the limit: the body ends, the reader is told
    with pytest.raises(RequestEntityTooLarge):
        await asyncio.wait_for(waiting, 1)


async def test_a_flag_wakes_every_waiter_and_a_cancelled_wait_leaves_nothing() -> None:
    flag = Flag()
    first = asyncio.ensure_future(flag.wait())
    second = asyncio.ensure_future(flag.wait())
    gone = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    assert flag._waiters is not None
    assert len(flag._waiters) == 2
    flag.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert first.result() is True
    assert second.result() is True
    assert flag._waiters is None
    assert await asyncio.wait_for(flag.wait(), 1) is True  # set: at once
    flag.clear()
    again = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0.01)
    assert not again.done()
    flag.set()
    assert await asyncio.wait_for(again, 1) is True


async def test_views_read_bodies_and_sessions_without_a_secret_key(settings: Settings) -> None:
    app = create_app(settings)

    @app.post("/echo")
    async def echo() -> dict[str, object]:
        data = await request.get_data()
        return {"size": len(data), "session": dict(session)}

    @app.post("/write-session")
    async def write_session() -> dict[str, object]:
        session["user"] = "x"  # no secret key: Quart refuses
        return {}

    async with app.test_app() as running:
        client = running.test_client()
        response = await client.post("/echo", data=b"x" * 70_000)
        assert response.status_code == 200
        assert await response.get_json() == {"size": 70_000, "session": {}}
        refused = await client.post("/write-session")
        assert refused.status_code == 500
        # The null session is one for every request, and stays empty.
        again = await client.post("/echo", data=b"")
        assert await again.get_json() == {"size": 0, "session": {}}
    sessions = app.session_interface
    assert await sessions.make_null_session(app) is await sessions.make_null_session(app)
