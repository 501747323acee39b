"""Cancellation that a library swallowed, raised again where a loop pauses.

redis-py (and asyncpg, for its timeouts) await through ``asyncio.wait_for``. On Python
3.11, ``wait_for`` can drop a cancellation that arrives just as the awaited operation
finishes (https://github.com/python/cpython/issues/86296, fixed in 3.12): the call
returns normally and the task stays "cancelling" with no ``CancelledError`` pending. A
loop that runs until cancelled then goes on forever, and a stopping worker waits for
it forever: seen as workers that never exited after SIGTERM, in 23-29 of 150-200
cancellations of the snapshot watcher 1-2 ms after it started.

So every loop of the service that talks to Redis or a database pauses through
:func:`pause`, or calls :func:`raise_if_cancelling` where it has no pause; and a task
that stops another waits for it a bounded time (:func:`stop`), so that a cancellation
lost somewhere else still cannot hold a stopping worker.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["pause", "raise_if_cancelling", "stop"]

_log = logging.getLogger("quart_service")


def raise_if_cancelling(task: asyncio.Task[object] | None = None) -> None:
    """Raise ``CancelledError`` if ``task`` (default: the current one) was asked to
    cancel and the request was swallowed below us."""
    if task is None:
        task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(seconds: float) -> None:
    """``asyncio.sleep(seconds)``, after raising a swallowed cancellation."""
    raise_if_cancelling()
    await asyncio.sleep(seconds)


async def stop(task: asyncio.Task[object], what: str, within: float = 5.0) -> None:
    """Cancel ``task`` and wait for it to end, at most ``within`` seconds: past that,
    log it (as ``what``) and go on; the event loop's close cancels it again."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=within)
    if not done:
        _log.warning("%s did not stop within %.0f s of its cancellation; going on", what, within)
    elif not task.cancelled() and task.exception() is not None:
        _log.debug("%s ended with %r while stopping", what, task.exception())
