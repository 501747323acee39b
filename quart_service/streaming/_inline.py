"""An async generator pulled inline, in the response's own task, as bare Quart does.

A producer task per stream, handing events over through a channel, cost a second
task step and a future on every event: on a paced stream (one event per loop turn, as
a model yields tokens) the service spent twice what bare Quart spends per event.
Here the response's task runs the generator itself, and the server's own ``send``
gives the backpressure: nothing is produced that the client has not made room for.

What this adds to a plain ``async for`` is that it drives each step of the generator
by hand (what ``await`` would do), so it can tell:

* an item that was *ready*: the step finished without suspending. Ready items are
  gathered into one write (a burst, or tokens queued while the last write was in
  flight); an item that needed waiting is sent at once, alone, never held back.
* a wait that must be cut short: a heartbeat, a timeout or the drain is due while the
  generator waits on something. The task waits on a *gate* future that either the
  generator's future or :meth:`InlineSource.interrupt` opens, so the generator stays
  suspended, untouched, and is resumed by the next pull.

Each step runs in the view's context (``Context.run``, as a task runs its steps), so
the generator sees ``request``, the app and the service's accessors as the view did.
A cancelled task (the client went away) is passed on as :class:`asyncio.Task` would
pass it: the future the generator waits on is cancelled and the error thrown into it,
so its ``finally`` blocks run at once.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterable, Callable, Coroutine, Generator
from contextvars import Context
from typing import Any, Final

_log = logging.getLogger("quart_service.streaming")

FAILED: Final = ("stream_failed", "The stream's producer failed; the error was logged.")


class InlineSource:
    """Pulls encoded items from one async generator, in the caller's task."""

    __slots__ = (
        "_agen",
        "_context",
        "_encode",
        "_gate",
        "_loop",
        "_step",
        "_turned",
        "_watched",
        "_yielded",
        "cut",
        "failure",
        "finished",
    )

    def __init__(
        self,
        source: AsyncIterable[Any],
        encode: Callable[[Any], bytes],
        context: Context,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._agen = aiter(source)
        self._context = context
        self._encode = encode
        self._loop = loop
        # The generator's current step (its __anext__ awaitable) while it is suspended
        # in an await, and what it yielded to the event loop there (None: one turn).
        self._step: Coroutine[Any, Any, Any] | None = None
        self._yielded: Any = None
        self._gate: asyncio.Future[None] | None = None
        self._turned = True  # the loop ran during the last pull
        self._watched: asyncio.Future[Any] | None = None  # has our done callback
        self.finished = False  # the generator ended (or failed): pull no more
        self.failure: tuple[str, str] | None = None
        self.cut = False  # interrupted: pull returns instead of waiting

    @types.coroutine
    def pull(self, limit: int) -> Generator[Any, Any, tuple[bytes, int]]:
        """Wait for the next item, then take every item that is ready too, up to
        ``limit`` bytes: ``(data, count)``. ``(b"", 0)`` when the generator ended
        (see :attr:`finished`) or when :meth:`interrupt` cut the wait short.

        One frame per event is the point: this loop is the whole per-token path."""
        parts: list[bytes] = []
        size = 0
        if not self._turned and self._step is None:
            # The last pull never let the loop run (every item was ready), and a send
            # need not suspend either (Hypercorn's does not once the client is gone):
            # without this turn, a generator that never awaits would hold the worker.
            yield None
        self._turned = False
        run = self._context.run
        while not self.finished:
            step = self._step
            error: BaseException | None = None
            if step is None:
                # An async generator's __anext__() awaitable has send() and throw().
                step = self._agen.__anext__()  # type: ignore[assignment]
            elif parts or self.cut:
                break  # send what is ready; the step stays suspended for next time
            else:
                # Wait for what the step awaits, as its task would.
                self._turned = True
                awaited = self._yielded
                if not isinstance(awaited, asyncio.Future):
                    try:  # a bare yield (asyncio.sleep(0)): one loop turn
                        yield awaited
                    except BaseException as cancelled:
                        error = cancelled
                elif not awaited.done():
                    gate = self._gate = self._loop.create_future()
                    if self._watched is not awaited:
                        self._watched = awaited
                        awaited.add_done_callback(self._on_awaited)
                    try:
                        yield from gate
                    except BaseException as cancelled:
                        self._cancel_awaited()
                        error = cancelled
                    finally:
                        self._gate = None
                    if error is None and not awaited.done():
                        break  # cut short; the step still waits
                self._watched = None
            assert step is not None
            try:
                yielded = run(step.send, None) if error is None else run(step.throw, error)
            except StopIteration as produced:
                self._step = None
                item = produced.value
            except StopAsyncIteration:
                self._step, self.finished = None, True
                break
            except Exception:
                _log.exception("stream producer failed")
                self._step, self.finished, self.failure = None, True, FAILED
                break
            except BaseException:
                # Cancellation (the client left) or an exit: the generator is done;
                # the caller's task goes on raising it.
                self._step, self.finished = None, True
                raise
            else:
                self._step, self._yielded = step, yielded
                continue
            try:
                data = self._encode(item)
            except Exception:
                _log.exception("a stream item could not be encoded")
                self.finished, self.failure = True, FAILED
                break
            parts.append(data)
            size += len(data)
            if size >= limit:
                break
        if not parts:
            return b"", 0
        return (parts[0] if len(parts) == 1 else b"".join(parts)), len(parts)

    def interrupt(self) -> None:
        """Cut the current wait short, and the next ones until :attr:`cut` is reset
        (the caller has something else to do)."""
        self.cut = True
        gate = self._gate
        if gate is not None and not gate.done():
            gate.set_result(None)

    def closing(self) -> asyncio.Task[None]:
        """A task (in the view's context) that stops the generator: a suspended step is
        cancelled as a task's would be, then the generator is closed, so its
        ``finally`` blocks run now."""
        return self._loop.create_task(self._aclose(), context=self._context)

    async def _aclose(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            self._cancel_awaited()
            await _finish(step, asyncio.CancelledError())
        closing = self._agen
        self.finished = True
        aclose = getattr(closing, "aclose", None)
        if aclose is not None:
            await aclose()

    # -- internals ----------------------------------------------------------------------

    def _on_awaited(self, _: asyncio.Future[Any]) -> None:
        gate = self._gate
        if gate is not None and not gate.done():
            gate.set_result(None)

    def _cancel_awaited(self) -> None:
        # What Task.cancel() does to the future its coroutine waits on.
        awaited = self._yielded
        if isinstance(awaited, asyncio.Future) and not awaited.done():
            awaited.cancel()


@types.coroutine
def _finish(step: Coroutine[Any, Any, Any], error: BaseException) -> Generator[Any, Any, None]:
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
