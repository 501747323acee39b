"""A cancellation swallowed below a loop still ends it; a stuck task cannot hold its stopper."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from quart_service.cancelling import pause, stop


def _looping(
    wait: Callable[[float], Awaitable[None]], turns: list[int]
) -> Coroutine[Any, Any, None]:
    """A loop until cancelled whose call swallows the first cancellation, as
    ``asyncio.wait_for`` does on Python 3.11 when it arrives as the awaited operation
    finishes; it pauses with ``wait`` between turns."""

    async def loop() -> None:
        swallowed = False
        while True:
            turns.append(1)
            try:
                await asyncio.sleep(0.05)  # the library's call
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # the caller sees a normal return
            await wait(0.01)

    return loop()


async def test_a_loop_that_pauses_ends_even_when_a_call_swallowed_its_cancellation() -> None:
    guarded = asyncio.create_task(_looping(pause, []))
    await asyncio.sleep(0.02)  # inside the call
    guarded.cancel()
    done, _ = await asyncio.wait([guarded], timeout=1)
    assert done
    assert guarded.cancelled()

    # The same loop pausing with a plain sleep goes on: the cancellation is gone.
    turns: list[int] = []
    plain = asyncio.create_task(_looping(asyncio.sleep, turns))
    await asyncio.sleep(0.02)
    plain.cancel()
    done, _ = await asyncio.wait([plain], timeout=0.3)
    assert not done
    assert plain.cancelling() == 1
    before = len(turns)
    await asyncio.sleep(0.15)
    assert len(turns) > before  # still looping
    plain.cancel()  # its call no longer swallows: this one ends it
    done, _ = await asyncio.wait([plain], timeout=1)
    assert done
    assert plain.cancelled()


async def test_stop_waits_a_bounded_time_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    refusing = True

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if not refusing:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, logger="quart_service"):
        started = loop.time()
        await stop(task, "the stubborn task", within=0.2)
        assert loop.time() - started < 1
    assert "the stubborn task did not stop within" in caplog.text
    assert not task.done()
    refusing = False
    await stop(task, "the stubborn task, now willing")
    assert task.cancelled()

    polite = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    await stop(polite, "a polite task")
    assert polite.cancelled()
