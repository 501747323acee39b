"""An async generator pulled inline by the task that sends it, not pushed from a producer.

A producer task per stream, handing events over through a channel, cost a second
task step and a future on every event: on a paced stream (one event per loop turn, as
a model yields tokens) the service spent twice what bare Quart spends per event.
Here one task pulls the generator and sends what it yields (:meth:`InlineSource.stream`
is that task's coroutine), and the server's own ``send`` gives the backpressure:
nothing is produced that the client has not made room for.

Per event, the next step of the generator is started by hand, and the rest of it is
awaited exactly as ``async for`` would (``yield from``, in C). If the step finishes
without suspending, its item was ready, and the items ready behind it join the same
write (a burst, or tokens queued while the last write was in flight); the look for
them may leave a step suspended, which the next pull hands to the task. An item that
was waited for leaves at once, alone, before the generator goes on: never held back
for a look ahead, nor behind the generator's own work after it.

Cutting a wait short (an idle or total timeout, the drain) is a cancellation of the
pulling task, as ``asyncio.timeout`` does it: the generator gets the
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
from typing import Any, Final, cast

_log = logging.getLogger("quart_service.streaming")

FAILED: Final = ("stream_failed", "The stream's producer failed; the error was logged.")
_CHUNK: Final = object()  # yielded by ByHand's send: a chunk is ready


class SourceState:
    """What :class:`~.body.StreamBody` reads (and resets) on a source of either kind:
    the tallies its clock moves to the metrics, whether the response waits for the
    producer now (not for the client), the heartbeat being written beside it, and
    whether (and how) the producer ended."""

    __slots__ = ("beat", "failure", "finished", "interrupted", "joined", "pulling", "writes")

    def __init__(self) -> None:
        # Writes of events, and the events that shared a write with another: a paced
        # stream's write carries one event, so it moves one tally, not two.
        self.writes = self.joined = 0
        self.pulling = False
        # Something other than the next event needs the sender: a deadline or the
        # drain, the producer's end, a heartbeat still being written. One flag, so the
        # per-event path checks one thing (an InlineSource's; a ThreadSource's reader
        # checks ``finished`` beside it).
        self.interrupted = False
        self.beat: asyncio.Task[None] | None = None
        self.finished = False  # the producer ended (or failed): pull no more
        # Why the stream ends in error (code, message): the producer failed (then it
        # is finished too), or an item it yielded could not be encoded (then it is
        # alive, and the body closes it).
        self.failure: tuple[str, str] | None = None


class InlineSource(SourceState):
    """Pulls encoded items from one async generator, in the task that sends them."""

    __slots__ = (
        "_agen",
        "_context",
        "_encode",
        "_limit",
        "_loop",
        "_next",
        "_next_frame",
        "_owe_turn",
        "_step",
        "_yielded",
        "cutting",
        "task",
    )

    def __init__(
        self,
        source: AsyncIterable[Any],
        encode: Callable[[Any], bytes],
        limit: int,
        next_frame: Callable[[], Awaitable[bytes | None]],
        loop: asyncio.AbstractEventLoop,
        context: Context,
    ) -> None:
        super().__init__()
        self._agen = aiter(source)
        # A step of the generator, as an iterator, called with None: for an async
        # generator its own bound asend() gives one directly, as anext() does, with no
        # method wrapper, partial or __await__ called per step.
        agen = self._agen
        self._next: Callable[[None], Generator[Any, None, Any]] = (
            # What asend() returns is an iterator, though typeshed calls it a Coroutine.
            cast("Callable[[None], Generator[Any, None, Any]]", agen.asend)
            if isinstance(agen, types.AsyncGeneratorType)
            else lambda _: agen.__anext__().__await__()
        )
        self._encode = encode
        self._limit = limit
        self._next_frame = next_frame  # the body's own frame, when interrupted or ended
        self._loop = loop
        self._context = context  # the view's: the generator's finally blocks run in it
        self.task: asyncio.Task[Any] | None = None  # the task that pulls: set before it does
        # A step started by hand that suspended: the generator's __anext__ awaitable,
        # and what it yielded to the event loop (a future, or None for one turn).
        self._step: Generator[Any, Any, Any] | None = None
        self._yielded: Any = None
        self._owe_turn = False  # the last pull never let the event loop run
        self.cutting = False  # cut() cancelled the task; the pull takes it back

    @types.coroutine
    def stream(self, send: Callable[[Any], Awaitable[None]]) -> Generator[Any, Any, None]:
        """Pull, gather and send every chunk until the stream ends.

        This generator is the whole per-token path of a stream, one frame for the
        stream's life: wait for the next item, take every item that is ready too (up
        to the byte limit), send them as one chunk. Everything rarer is behind the one
        :attr:`interrupted` flag: when the generator ended, or :meth:`cut` cut the
        wait short, the body's ``next_frame`` decides what to send instead (an error
        or a shutdown event, or nothing: pull on)."""
        # Locals: a slot read through LOAD_METHOD is not specialised (~100 instructions).
        next_frame, next_step, encode = self._next_frame, self._next, self._encode
        counted: Any = send  # the request observer's exchange, if it is one
        direct = False  # yield from what the server's send returns, as it is (_direct)
        sent = 0  # bytes written with the server's own send, for the exchange's count
        try:
            while True:
                if self.interrupted:
                    yield from self._settle()
                    try:
                        frame = yield from next_frame().__await__()
                    except StopAsyncIteration:
                        return
                    if frame is None:
                        continue
                    data = frame
                else:
                    self.pulling = True
                    try:
                        # Not None from the moment the generator runs in this pull: a
                        # cancellation that comes then went through the generator.
                        step = self._step
                        if step is not None:  # started by the last gathering, and waiting
                            self._step = None
                            awaited = self._yielded
                        else:
                            step = next_step(None)
                            try:
                                awaited = step.send(None)  # run it up to its first wait
                            except StopIteration as produced:  # ready: more may be too
                                item, step = produced.value, None
                        if step is not None:
                            # It waits: hand what it awaits to the task, as its await
                            # would (_resume() inline: as a generator of its own it
                            # would cost a frame per paced token).
                            while True:
                                try:
                                    yield awaited
                                except BaseException as error:
                                    try:
                                        awaited = step.throw(error)
                                    except StopIteration as produced:
                                        item = produced.value
                                        break
                                    continue
                                item = yield from step  # the rest of the step, in C
                                break
                    except StopAsyncIteration:
                        self._ended()
                        continue
                    except asyncio.CancelledError:
                        if step is not None:
                            self.finished = True  # it went through the generator
                        if not self.cutting:
                            raise
                        self.cutting = False
                        if self.task is not None and self.task.uncancel() > 0:
                            raise  # the client left too
                        self.interrupted = True  # the body says what follows the cut
                        continue
                    except Exception:
                        self._failed()
                        continue
                    finally:
                        self.pulling = False
                    if self.interrupted:  # e.g. a heartbeat still being written
                        yield from self._settle()
                    # An item that came without waiting may have others ready behind
                    # it (a burst, or tokens queued during the last write): they share
                    # the write. One that was waited for goes at once, alone.
                    if step is None:
                        data = self._gather(item)
                        if not data:
                            continue  # it could not be encoded: the body ends the stream
                    else:
                        try:
                            data = encode(item)
                        except Exception:
                            self._unencodable()
                            continue
                    self.writes += 1
                if not direct:
                    message = {"type": "http.response.body", "body": data, "more_body": True}
                    if send is counted:
                        # The first chunk goes through the observer's exchange (which
                        # times it, and returns the server's own awaitable); the rest
                        # with the server's own send, their bytes counted here. A send
                        # that is no exchange (a body iterated by hand) is used as it is.
                        awaitable = send(message)
                        server_send = getattr(counted, "server_send", None)
                        if server_send is None:
                            counted = None
                        else:
                            send, direct = server_send, _direct(awaitable)
                        yield from awaitable.__await__()
                    else:  # any awaitable
                        sent += len(data)
                        yield from send(message).__await__()
                    continue
                # The server's own send. The message is the first chunk's, kept: the
                # server is done with it when its send returns (Hypercorn, Uvicorn and
                # Granian each read the body at once), and a dict per token cost more
                # than the rest of a write's Python.
                message["body"] = data
                sent += len(data)
                yield from send(message)  # type: ignore[misc]
        finally:
            if sent and counted is not None:
                counted.sent += sent

    def cut(self) -> None:
        """End the current wait (called while the task waits for the generator)."""
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

    def _ended(self) -> None:
        """The producer ended: pull no more; the body says what follows."""
        self.finished = self.interrupted = True

    def _failed(self) -> None:
        """The producer raised (called in its ``except``): logged, and the stream ends
        with an error event."""
        _log.exception("stream producer failed")
        self.failure = FAILED
        self._ended()

    def _unencodable(self) -> None:
        """An item could not be encoded (called in its ``except``): the stream ends
        with an error frame, and the generator, still alive, is closed by the body
        (not ``finished``: its ``finally`` blocks must run)."""
        _log.exception("a stream item could not be encoded")
        self.failure, self.interrupted = FAILED, True

    def _gather(self, item: Any) -> bytes:
        """``item``, and after it every item that is ready without waiting, encoded
        (those after it counted in :attr:`joined`); empty if ``item`` could not be
        encoded."""
        encode, next_step = self._encode, self._next  # locals, as in stream()
        try:
            data = encode(item)
        except Exception:
            self._unencodable()
            return b""
        parts: list[bytes] | None = None
        size, limit = len(data), self._limit
        while size < limit:
            step = next_step(None)
            try:
                yielded = step.send(None)
            except StopIteration as produced:
                item = produced.value
            except StopAsyncIteration:
                self._ended()
                break
            except Exception:
                self._failed()
                break
            else:  # it waits: keep the step for the next pull; send what we have
                self._step, self._yielded = step, yielded
                break
            try:
                more = encode(item)
            except Exception:
                self._unencodable()
                break
            if parts is None:
                parts = [data]
            parts.append(more)
            size += len(more)
        else:  # everything was ready up to the limit: give the loop a turn first
            self._owe_turn = self.interrupted = True
        if parts is None:
            return data
        self.joined += len(parts) - 1
        return b"".join(parts)

    @types.coroutine
    def _settle(self) -> Generator[Any, Any, None]:
        """What an interruption may owe before the next write: a cut's cancellation
        that the generator swallowed (it went on) taken back, the heartbeat being
        written beside finished (one write at a time), and the event loop's turn
        that a gathering up to the limit never gave."""
        if self.cutting:
            self.cutting = False
            if self.task is not None:
                self.task.uncancel()
        beat = self.beat
        if beat is not None and not beat.done():
            yield from beat
        if self._owe_turn:
            # A send need not suspend either (Hypercorn's does not once the client is
            # gone): without this turn, a generator that never awaits would hold the
            # worker. docs/design.md, pitfall 15.
            self._owe_turn = False
            yield None

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


class _Handed:
    """What :class:`ByHand`'s send returns: awaited, it yields :data:`_CHUNK` once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, None]:
        yield _CHUNK


_HANDED: Final = _Handed()


class ByHand:
    """An :class:`InlineSource` iterated chunk by chunk (a body iterated with
    ``async for`` rather than sent): :meth:`InlineSource.stream` runs with a send that
    hands each chunk back, so both ways share the one per-token path."""

    __slots__ = ("_chunk", "_stream")

    def __init__(self, source: InlineSource) -> None:
        self._chunk = b""
        self._stream = source.stream(self._hand)

    def _hand(self, message: Any) -> _Handed:
        self._chunk = message["body"]
        return _HANDED

    @types.coroutine
    def next(self) -> Generator[Any, Any, bytes]:
        """The next chunk; ``StopAsyncIteration`` at the end."""
        stream = self._stream
        sent: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = stream.send(sent) if error is None else stream.throw(error)
            except StopIteration:
                raise StopAsyncIteration from None
            if yielded is _CHUNK:
                return self._chunk
            try:  # what the stream awaits, handed to the task, as an await would
                sent, error = (yield yielded), None
            except BaseException as thrown:
                error = thrown


def _direct(awaitable: Any) -> bool:
    """Whether ``yield from`` may take what a server's send returned as it is, as
    ``await`` would, sparing the stream loop a call of ``__await__()`` per token (a
    slot wrapper called from Python: ~170 instructions, measured under Granian).

    True for a coroutine (Hypercorn's and Uvicorn's send) and for an awaitable that
    is its own iterator both ways, as each of Granian's is (``PyEmptyAwaitable``,
    ``PyFutureAwaitable`` and the rest in its ``src/callbacks.rs``). Judged on the
    first one: a server's send returns one kind of awaitable.
    """
    if type(awaitable) is types.CoroutineType:
        return True
    try:
        return bool(awaitable.__await__() is awaitable and iter(awaitable) is awaitable)
    except Exception:  # not iterable, or an __await__ that fails here
        return False


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
