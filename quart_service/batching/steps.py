"""Step-level batching for streams: the active streams share every step.

A stream is a state stepped until it is finished (a sequence being decoded, one token
per step). ``async for out in batcher.stream(state)`` puts the state in the batch;
one task per batcher then runs ``step(states)`` once per step, on the pool through
``run``, for every active state at once, and hands each stream its own output.
Streams join and leave only between steps, so a step always sees the same states from
start to end:

- **Joining.** A new stream waits for a free slot (at most ``max_batch`` are active)
  and joins at the next step, never during one.
- **Finishing.** A stream ends after the step that sets ``state.finished``; its slot
  is free for the next step.
- **Leaving early.** A stream whose consumer stops (``aclose()``, ``break``), or whose
  task is cancelled where it waits (the client went away, a stream timeout: the
  service cancels the task that pulls the stream, and the cancellation arrives
  here), is taken out of the batch at once: the next step runs without it and a waiting stream takes
  its slot. A step already running for it on a thread finishes (a thread cannot be
  interrupted) and its output is dropped; a step that has not yet reached a thread
  leaves it out. Do not reuse a state after its stream left: that last step may still
  be writing to it.
- **Slow consumers.** Each stream keeps at most ``buffer`` outputs its consumer has
  not taken. A stream whose buffer is full sits the next steps out (its state waits,
  nothing is lost or reordered) until its consumer takes an output; the other streams
  step on without waiting for it. While streams wait for a slot, a paused stream gives
  its slot up (it is *parked*) and, once its consumer reads, waits for a slot again
  ahead of new streams; so a client that stops reading holds neither the batch nor
  the queue. When every stream is paused, no step runs and no thread is busy until
  one reads.
- **Nothing for a stream.** A step may have nothing for some of its streams (a prompt
  fed over several steps, a stream that sat the step out): the ``empty`` output, when
  the batcher is given one, is not handed over and wakes no consumer.
- **Failures.** An exception from ``step`` (or ``run``, or a wrong number of
  outputs) ends every stream of that step: each one's iterator raises it, after the
  outputs it already had. Streams that sat the step out, and later streams, go on.
- **Idle.** With no stream active or waiting, the stepping task ends: no task waits
  and no thread computes. The next stream starts it again.

One step is in flight per batcher at a time (a step needs the outputs of the one
before). The stepping task never waits on a consumer: it only hands outputs over, so
no consumer (slow, gone, or failing) can hold it, the failure behind the hangs
reported for Ray Serve's ``@serve.batch`` on cancellation (ray-project/ray#50046).
Static batching of streams (LitServe's batched streaming, Lightning-AI/LitServe#45)
keeps every stream of a batch until the longest one ends; here each leaves at its
own step.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["StepBatcher", "StepStats", "Steppable"]


class Steppable(Protocol):
    """What a stream's state must have: ``finished``, set by the step that ends it."""

    finished: bool


S = TypeVar("S", bound=Steppable)
O = TypeVar("O")  # noqa: E741 - the interface's name for a step's output


@dataclass(frozen=True, slots=True)
class StepStats:
    """A :class:`StepBatcher`'s counters since it was made, and its load now."""

    steps: int  # steps that ran step() (failed ones included)
    stepped: int  # states those steps carried
    mean_batch: float  # states per step
    largest_batch: int
    failed_steps: int
    skipped_steps: int  # steps not run: all their streams had left before a thread took it
    left_early: int  # streams that left before their state finished
    active: int  # streams in the batch now
    waiting: int  # streams waiting for a slot now
    paused: int  # streams sitting steps out, their consumer behind (parked ones included)
    running: bool  # the stepping task exists


class _Unset:
    """No ``empty`` output: every output is handed over."""

    __slots__ = ()


_UNSET = _Unset()

# Where a stream is: waiting for a slot, in the batch, parked (paused, its slot given
# up), or gone (ended or left: in no collection).
_WAITING, _ACTIVE, _PARKED, _GONE = 0, 1, 2, 3


class _Stream(Generic[S, O]):
    """One stream's place in the batcher."""

    __slots__ = ("done", "error", "left", "outputs", "place", "sat_out", "state", "waiter")

    def __init__(self, state: S) -> None:
        self.state = state
        self.outputs: deque[O] = deque()  # stepped, not yet taken by the consumer
        self.waiter: asyncio.Future[None] | None = None  # the consumer waits for an output
        self.place = _WAITING
        # Steps it sat out since its consumer last took an output from a full buffer: a
        # stream is parked only after its consumer had the time of a step to read.
        self.sat_out = 0
        self.done = False  # no more outputs: finished, failed, or the batcher stopped
        self.error: BaseException | None = None
        # The consumer left. Set on the event loop, read by the step job on its thread
        # to leave the state out: a bool read is atomic; a stale one costs one output.
        self.left = False

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class StepBatcher(Generic[S, O]):
    """Runs ``step(states)`` for all active streams at once, one step at a time.

    ``step`` advances every state it is given by one step, sets ``finished`` on those
    that are done, and returns one output per state, in order. ``run`` is how a step
    reaches the worker's pool, called as ``run(job, batch)``: for an engine,
    ``EngineContext.run_sync``. ``empty``: the output that means "nothing for this
    stream from this step"; it is dropped, not handed over (a consumer woken for
    nothing costs the event loop a task switch through its generators). The batcher
    belongs to one event loop (the worker's).
    """

    def __init__(
        self,
        step: Callable[[Sequence[S]], Sequence[O]],
        run: Callable[..., Awaitable[Any]],
        *,
        max_batch: int,
        buffer: int = 4,
        empty: O | _Unset = _UNSET,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if buffer < 1:
            raise ValueError(f"buffer must be at least 1, got {buffer}")
        self._step = step
        self._run = run
        self._max_batch = max_batch
        self._buffer = buffer
        self._empty = empty
        self._drops_empty = not isinstance(empty, _Unset)
        self._active: list[_Stream[S, O]] = []
        self._waiting: deque[_Stream[S, O]] = deque()
        self._parked: list[_Stream[S, O]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the task waits: all are paused
        self._steps_run = self._stepped = self._largest = 0
        self._failed = self._skipped = self._left_early = 0

    async def stream(self, state: S) -> AsyncGenerator[O, None]:
        """Join the batch (waits for a free slot, between steps), yield this state's output
        of every step until ``state.finished``; leaving (aclose, cancellation, client gone,
        timeout) removes the state before the next step and frees its slot."""
        if state.finished:
            return
        entry: _Stream[S, O] = _Stream(state)
        self._waiting.append(entry)
        self._start()
        try:
            while True:
                outputs = entry.outputs
                if outputs:
                    if len(outputs) >= self._buffer:
                        self._resume(entry)  # it sat steps out: it may step again
                    yield outputs.popleft()
                elif entry.done:
                    if entry.error is not None:
                        raise entry.error
                    return
                else:
                    waiter = entry.waiter = asyncio.get_running_loop().create_future()
                    await waiter
        finally:
            if not entry.done:
                self._leave(entry)

    def joinable(self) -> bool:
        """A stream waits for a slot and one is free: it joins at the next step. Safe to
        call from the step's thread (a step may end early to let it in sooner)."""
        return bool(self._waiting) and len(self._active) < self._max_batch

    def stats(self) -> StepStats:
        """The counters, for ``/debug/identity`` and the benchmarks."""
        buffer = self._buffer
        return StepStats(
            steps=self._steps_run,
            stepped=self._stepped,
            mean_batch=self._stepped / self._steps_run if self._steps_run else 0.0,
            largest_batch=self._largest,
            failed_steps=self._failed,
            skipped_steps=self._skipped,
            left_early=self._left_early,
            active=len(self._active),
            waiting=len(self._waiting),
            paused=len(self._parked)
            + sum(1 for entry in self._active if len(entry.outputs) >= buffer),
            running=self._task is not None,
        )

    # -- the consumer's side ----------------------------------------------------------

    def _start(self) -> None:
        if self._task is None:
            # A fresh context: the task outlives the request whose stream started it,
            # and must not keep that request's context (and what it references) alive.
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._steps(), context=contextvars.Context())
        else:
            self._poke()

    def _resume(self, entry: _Stream[S, O]) -> None:
        entry.sat_out = 0
        if entry.place == _PARKED:
            # Admitted before the streams still waiting: back to the front of the queue.
            self._parked.remove(entry)
            entry.place = _WAITING
            self._waiting.appendleft(entry)
            self._start()
        else:
            self._poke()

    def _leave(self, entry: _Stream[S, O]) -> None:
        entry.left = entry.done = True
        self._left_early += 1
        self._detach(entry)
        self._poke()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # -- the stepping task ------------------------------------------------------------

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._admit()
                if not self._active:
                    return
                batch = []
                for entry in self._active:
                    if len(entry.outputs) < self._buffer:
                        batch.append(entry)
                    else:
                        entry.sat_out += 1
                if not batch:
                    # Every consumer is behind: wait for a read, a leave or a newcomer.
                    self._wake = wake = loop.create_future()
                    try:
                        await wake
                    finally:
                        self._wake = None
                    continue
                try:
                    kept, outputs = await self._run(self._job, batch)
                    if outputs is None:
                        self._skipped += 1
                        continue
                    self._steps_run += 1
                    self._stepped += len(kept)
                    self._largest = max(self._largest, len(kept))
                    if len(outputs) != len(kept):
                        raise ValueError(
                            f"the step function returned {len(outputs)} outputs for "
                            f"{len(kept)} states: it must return one output per state, in order"
                        )
                except Exception as exc:
                    self._failed += 1
                    for entry in batch:
                        if not entry.done:
                            self._end(entry, exc)
                    continue
                empty, drops = self._empty, self._drops_empty
                for entry, output in zip(kept, outputs, strict=True):
                    if entry.done:  # it left during the step: nobody takes this output
                        continue
                    handed = not drops or output != empty
                    if handed:
                        entry.outputs.append(output)
                    if entry.state.finished:
                        self._end(entry, None)
                    elif handed:
                        entry.wake()
        except BaseException:
            # Cancelled (the event loop is closing): no stream may wait for a step that
            # will never come.
            stopped = RuntimeError("the step batcher was stopped; the stream cannot go on")
            for entry in [*self._active, *self._waiting, *self._parked]:
                self._end(entry, stopped)
            raise
        finally:
            self._task = None

    def _admit(self) -> None:
        """Fill free slots from the waiting streams (between steps only); while streams
        wait and no slot is free, paused streams give theirs up."""
        waiting, active = self._waiting, self._active
        if waiting and len(active) >= self._max_batch:
            buffer = self._buffer
            paused = [e for e in active if len(e.outputs) >= buffer and e.sat_out > 0]
            for entry in paused:
                if len(active) < self._max_batch - len(waiting) + 1:
                    break  # enough slots for every waiting stream
                active.remove(entry)
                entry.place = _PARKED
                self._parked.append(entry)
        while waiting and len(active) < self._max_batch:
            entry = waiting.popleft()
            entry.place = _ACTIVE
            active.append(entry)

    def _job(self, batch: list[_Stream[S, O]]) -> tuple[list[_Stream[S, O]], Sequence[O] | None]:
        """One step, on a pool thread, for the streams still there when it starts."""
        kept = [entry for entry in batch if not entry.left]
        if not kept:
            return kept, None
        try:
            return kept, self._step([entry.state for entry in kept])
        except StopIteration as exc:
            # A future cannot hold StopIteration: the pool's hand-over to the event loop
            # would fail and the step would never finish.
            raise RuntimeError("the step function raised StopIteration") from exc

    def _end(self, entry: _Stream[S, O], error: BaseException | None) -> None:
        """No more steps for ``entry``: free its slot and let its consumer finish."""
        entry.done = True
        entry.error = error
        self._detach(entry)
        entry.wake()

    def _detach(self, entry: _Stream[S, O]) -> None:
        place, entry.place = entry.place, _GONE
        if place == _ACTIVE:
            self._active.remove(entry)
        elif place == _PARKED:
            self._parked.remove(entry)
        elif place == _WAITING:
            self._waiting.remove(entry)
