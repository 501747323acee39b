"""An async generator pulled inline, in the response's own task, as bare Quart does.

A producer task per stream, handing events over through a channel, cost a second
task step and a future on every event: on a paced stream (one event per loop turn, as
a model yields tokens) the service spent twice what bare Quart spends per event.
Here the response's task runs the generator itself, and the server's own ``send``
gives the backpressure: nothing is produced that the client has not made room for.

Per event, the generator is awaited exactly as ``async for`` would (``yield from``,
in C), with one addition: after an item, the next step is *started* by hand. If it
finishes without suspending, its item was ready, and it joins the same write (a
burst, or tokens queued while the last write was in flight); if it suspends, what it
awaits is handed to the task on the next pull, and the item already taken leaves at
once, never held back.

Cutting a wait short (an idle or total timeout, the drain) is a cancellation of the
response's task, as ``asyncio.timeout`` does it: the generator gets the
``CancelledError`` where it awaits, its ``finally`` blocks run, and the pull takes
the cancellation back (``Task.uncancel``) and reports the cut. Heartbeats never
interrupt the generator: :class:`~.body.StreamBody` writes them beside it.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterable, Awaitable, Callable, Generator
from contextvars import Context
from typing import Any, Final

_log = logging.getLogger("quart_service.streaming")

FAILED: Final = ("stream_failed", "The stream's producer failed; the error was logged.")
_NOTHING: Final = object()


class SourceState:
    """What :class:`~.body.StreamBody` reads (and resets) on a source of either kind:
    the tallies its clock moves to the metrics, whether the response waits for the
    producer now (not for the client), the heartbeat being written beside it, and
    whether (and how) the producer ended."""

    __slots__ = ("beat", "events", "failure", "finished", "interrupted", "pulling", "writes")

    def __init__(self) -> None:
        self.events = self.writes = 0
        self.pulling = False
        self.interrupted = False  # the body has a frame of its own due (a deadline, the drain)
        self.beat: asyncio.Task[None] | None = None
        self.finished = False  # the producer ended (or failed): pull no more
        self.failure: tuple[str, str] | None = None


class InlineSource(SourceState):
    """Pulls encoded items from one async generator, in the response's task."""

    __slots__ = (
        "_agen",
        "_context",
        "_encode",
        "_limit",
        "_loop",
        "_on_empty",
        "_step",
        "_turned",
        "_yielded",
        "cutting",
        "task",
    )

    def __init__(
        self,
        source: AsyncIterable[Any],
        encode: Callable[[Any], bytes],
        limit: int,
        on_empty: Callable[[], Awaitable[bytes]],
        loop: asyncio.AbstractEventLoop,
        context: Context,
    ) -> None:
        super().__init__()
        self._agen = aiter(source)
        self._encode = encode
        self._limit = limit
        self._on_empty = on_empty  # the body's next frame when a pull brought nothing
        self._loop = loop
        self._context = context  # the view's: the generator's finally blocks run in it
        self.task: asyncio.Task[Any] | None = None  # the task that pulls: set before it does
        # A step started by hand that suspended: the generator's __anext__ awaitable,
        # and what it yielded to the event loop (a future, or None for one turn).
        self._step: Generator[Any, Any, Any] | None = None
        self._yielded: Any = None
        self._turned = True  # the last pull let the event loop run
        self.cutting = False  # cut() cancelled the task; the pull takes it back

    @types.coroutine
    def pull(self) -> Generator[Any, Any, bytes]:
        """The next chunk: wait for the next item, then take every item that is ready
        too, up to the byte limit. When the generator ended, or :meth:`cut` cut the
        wait short, the body's ``on_empty`` decides what to send instead.

        This generator is the whole per-token path of a stream: one frame per event."""
        item: Any = _NOTHING
        touched = False  # the generator ran in this pull
        self.pulling = True
        try:
            step = self._step
            if step is not None:
                self._step = None
                touched = True
                awaited = self._yielded
                while True:  # hand what it awaits to the task, as its own await would
                    try:
                        yield awaited
                    except BaseException as error:
                        try:
                            awaited = step.throw(error)
                        except StopIteration as produced:
                            item = produced.value
                            break
                        continue
                    item = yield from step  # the rest of the step, awaited in C
                    break
            else:
                if not self._turned:
                    # The last pull never let the loop run (every item was ready), and
                    # a send need not suspend either (Hypercorn's does not once the
                    # client is gone): without this turn, a generator that never
                    # awaits would hold the worker. docs/design.md, pitfall 15.
                    yield None
                touched = True
                item = yield from self._agen.__anext__().__await__()
        except StopAsyncIteration:
            self.finished = True
        except asyncio.CancelledError:
            if touched:
                self.finished = True  # the cancellation went through the generator
            if not self.cutting:
                raise
            self.cutting = False
            if self.task is not None and self.task.uncancel() > 0:  # the client left too
                raise
        except Exception:
            _log.exception("stream producer failed")
            self.finished, self.failure = True, FAILED
        finally:
            self.pulling = False
        if item is _NOTHING:
            return (yield from self._on_empty().__await__())
        if self.cutting:  # the generator swallowed our cancellation and went on
            self.cutting = False
            if self.task is not None:
                self.task.uncancel()
        data, count = self._gather(item)
        if not count:
            return (yield from self._on_empty().__await__())
        self.events += count
        self.writes += 1
        beat = self.beat
        if beat is not None and not beat.done():
            yield from beat  # one write at a time: the heartbeat's first
        return data

    @types.coroutine
    def stream(self, send: Callable[[Any], Awaitable[None]]) -> Generator[Any, Any, None]:
        """Pull and send every chunk until the stream ends: the server's send loop and
        :meth:`pull` in one frame, resumed once per event (Quart's own loop would step
        the body's ``__anext__`` and start a new :meth:`pull` for every event)."""
        on_empty = self._on_empty
        while True:
            try:
                if self.interrupted or self.finished:
                    data = yield from on_empty().__await__()
                else:
                    data = yield from self.pull()
            except StopAsyncIteration:
                return
            yield from send(
                {"type": "http.response.body", "body": data, "more_body": True}
            ).__await__()

    def cut(self) -> None:
        """End the current wait (called while the task waits inside :meth:`pull`)."""
        if not self.cutting and not self.finished and self.task is not None:
            self.cutting = True
            self.task.cancel()

    def closing(self) -> asyncio.Task[None] | None:
        """A task that stops the generator, or None if it needs none: a step left
        suspended is cancelled as a task's would be, then the generator is closed, so
        its ``finally`` blocks run now."""
        if self.finished:
            return None
        self.finished = True
        return self._loop.create_task(self._aclose(), context=self._context)

    # -- internals ----------------------------------------------------------------------

    def _gather(self, item: Any) -> tuple[bytes, int]:
        """``item``, and after it every item that is ready without waiting."""
        try:
            data = self._encode(item)
        except Exception:
            _log.exception("a stream item could not be encoded")
            self.finished, self.failure = True, FAILED
            return b"", 0
        parts: list[bytes] | None = None
        size, limit = len(data), self._limit
        while size < limit:
            step = self._agen.__anext__().__await__()
            try:
                yielded = step.send(None)
            except StopIteration as produced:
                item = produced.value
            except StopAsyncIteration:
                self.finished = True
                break
            except Exception:
                _log.exception("stream producer failed")
                self.finished, self.failure = True, FAILED
                break
            else:  # it waits: keep the step for the next pull; send what we have
                self._step, self._yielded, self._turned = step, yielded, True
                break
            try:
                more = self._encode(item)
            except Exception:
                _log.exception("a stream item could not be encoded")
                self.finished, self.failure = True, FAILED
                break
            if parts is None:
                parts = [data]
            parts.append(more)
            size += len(more)
        else:
            self._turned = False  # everything was ready up to the limit
        if parts is None:
            return data, 1
        return b"".join(parts), len(parts)

    async def _aclose(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            awaited = self._yielded
            if isinstance(awaited, asyncio.Future) and not awaited.done():
                awaited.cancel()  # what Task.cancel() does to the future it waits on
            await _finish(step, asyncio.CancelledError())
        aclose = getattr(self._agen, "aclose", None)
        if aclose is not None:
            await aclose()


@types.coroutine
def _finish(step: Generator[Any, Any, Any], error: BaseException) -> Generator[Any, Any, None]:
    """Throw ``error`` into a suspended step and drive it to its end (its except and
    finally blocks may await); what it raises or produces is dropped."""
    try:
        yielded = step.throw(error)
        while True:
            try:
                sent = yield yielded
            except BaseException as again:
                yielded = step.throw(again)
            else:
                yielded = step.send(sent)
    except (StopIteration, StopAsyncIteration, asyncio.CancelledError):
        return
    except Exception:
        _log.exception("a stream producer failed while it was being stopped")


def start_now(
    awaitable: Awaitable[None], loop: asyncio.AbstractEventLoop, failed: str
) -> asyncio.Task[None] | None:
    """Run ``awaitable`` up to its first wait, here in the caller's callback; if it
    waits, a task finishes it (returned), else None. A failure is logged at debug
    level as ``failed``: a server's send fails when the client has gone, and the
    response's own next write sees that."""
    step = awaitable.__await__()
    try:
        yielded = step.send(None)
    except StopIteration:
        return None
    except Exception:
        _log.debug(failed, exc_info=True)
        return None
    return loop.create_task(_rest(step, yielded, failed))


async def _rest(step: Generator[Any, Any, Any], yielded: Any, failed: str) -> None:
    try:
        await _resume(step, yielded)
    except Exception:
        _log.debug(failed, exc_info=True)


@types.coroutine
def _resume(step: Generator[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on with a step that suspended on ``yielded``: hand that to the task, then
    drive the rest of the step as an ``await`` would."""
    while True:
        try:
            yield yielded
        except BaseException as error:
            try:
                yielded = step.throw(error)
            except StopIteration as done:
                return done.value
            continue
        return (yield from step)
